"""smartcam models package."""
