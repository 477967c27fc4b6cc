"""ofmipd: an authenticated SMTP submission front-end."""

__version__ = "0.1.0"
