"""`diff`: match the functions of two builds of a module and rank what changed."""
