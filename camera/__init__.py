"""smartcam camera package."""
