"""The HTML report of an experiment: `gather` reads every result under an outputs folder, `page` renders
one self-contained page (`vrlab task=report`)."""
