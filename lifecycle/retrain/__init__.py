"""Closing the loop: alerts → guard rails → retraining pipeline → gate → rollout (issue 21)."""
