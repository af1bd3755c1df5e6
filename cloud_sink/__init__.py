"""smartcam cloud_sink package."""
