"""The live demo: a toy vulnerable service and the script that patches it."""
