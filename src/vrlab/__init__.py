"""vrlab."""
