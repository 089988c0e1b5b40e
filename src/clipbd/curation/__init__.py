"""Curation: what a dataset curator does with a run's scores — look at the top of the ranking
(`report`), reverse-engineer what a suspicious cluster implants (`clipbd.inspect.invert`), remove it
and train again (`filter`)."""
