"""ELF modules as files: identity (`elf.identity`), symbols and function bounds
(`elf.image`), locations (`elf.location`), headers (`elf.header`).

Import the submodule you need: `identity` and `header` are light, `image`
loads pyelftools.
"""
