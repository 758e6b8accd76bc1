"""Evaluation of students: FID/KID through clean-fid on a chosen feature network, class
accuracy, sampling helpers (metrics) and the pictures people look at (plots)."""
