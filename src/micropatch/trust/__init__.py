"""Trust: the artifact format (`artifact`, `payload`, `canonical`), keys and
signatures (`keys`, `signatures`), and admission (`admission.admit`).

Import the submodule you need: this package imports nothing itself, so that a
light caller (`trust.paths`) does not pay for the crypto and the models.
"""
