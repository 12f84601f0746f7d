"""cohortreg workflows layer (see ../shared/DESIGN.md); populated by later issues."""
