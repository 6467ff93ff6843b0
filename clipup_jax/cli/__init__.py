"""Thin command-line entry points; each turns library errors into one line and a non-zero exit."""
