"""The AC score (cross-modal Alignment, visual Correspondence) and the AC law / AC policy."""
