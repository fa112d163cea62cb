"""Author tools: explore a module (functions, references, sites) and diff two builds."""
