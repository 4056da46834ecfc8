"""Stand-in for the AUTOMATIC1111 WebUI 1.10.1 `modules` package (tests only)."""
