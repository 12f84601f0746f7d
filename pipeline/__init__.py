"""cohortreg pipeline layer (see ../shared/DESIGN.md); populated by later issues."""
