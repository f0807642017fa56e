"""`cappa demo`: the main job end to end (pipeline.py) and its report (report.py)."""
