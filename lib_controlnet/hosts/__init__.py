"""Hosts put a Controller's residuals into a concrete UNet, and always take themselves out again."""
