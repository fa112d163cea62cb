"""Trust: the artifact format (`artifact`, `payload`, `canonical`), keys and
signatures (`keys`, `signatures`), and the one admission policy (`policy.admit`).

Import the submodule you need: this package imports nothing itself, so that a
light caller (`trust.paths`) does not pay for the crypto and the models.
"""
