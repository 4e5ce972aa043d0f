"""What the farm shows to other systems (Home Assistant)."""
