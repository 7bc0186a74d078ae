"""Project tools that are not part of the package (the recipe table)."""
