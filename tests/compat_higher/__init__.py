"""Programs written for higher run on loft, side by side with higher 0.2.1."""
