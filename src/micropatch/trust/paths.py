"""Where trusted keys are looked for: light, so the CLI can name it in its help."""

DEFAULT_TRUST_DIR = "/etc/micropatch/trusted"
TRUST_DIR_VARIABLE = "MICROPATCH_TRUST_DIR"
