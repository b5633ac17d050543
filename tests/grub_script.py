"""A GRUB-script tokenizer for the tests, written from GRUB 2.06's lexer rules
(grub-core/script/yylex.l): blanks separate words; ``'...'`` is literal; ``"..."`` expands
``$name``/``${name}`` and honours backslash; an unquoted backslash escapes one character; an
unquoted ``#`` at the start of a word starts a comment; unquoted ``;`` and newline end a command;
unquoted ``| & < >`` are operators (sidus never writes one: the tokenizer fails on them).
"""

from __future__ import annotations

OPERATORS = set(";|&<>\n")


def tokenize(text: str, env: dict[str, str]) -> list[list[str]]:
    """GRUB script ``text`` -> commands (lists of words after quote removal and expansion)."""
    cmds: list[list[str]] = []
    words: list[str] = []
    i, n = 0, len(text)

    def var(j: int) -> tuple[str, int]:
        if text[j] == "{":
            end = text.index("}", j)
            return env.get(text[j + 1:end], ""), end + 1
        k = j
        while k < n and (text[k].isalnum() or text[k] in "_?"):
            k += 1
        return env.get(text[j:k], ""), k

    while i < n:
        c = text[i]
        if c in " \t":
            i += 1
            continue
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c in ";\n":
            if words:
                cmds.append(words)
            words = []
            i += 1
            continue
        if c in "|&<>":
            raise AssertionError(f"GRUB operator {c!r} at {i} in {text!r}")
        word = ""
        while i < n and text[i] not in " \t" and text[i] not in OPERATORS:
            c = text[i]
            if c == "'":
                end = text.index("'", i + 1)
                word += text[i + 1:end]
                i = end + 1
            elif c == '"':
                i += 1
                while text[i] != '"':
                    if text[i] == "\\" and text[i + 1] in '$"\\\n':
                        word += text[i + 1]
                        i += 2
                    elif text[i] == "$":
                        val, i = var(i + 1)
                        word += val
                    else:
                        word += text[i]
                        i += 1
                i += 1
            elif c == "\\":
                word += text[i + 1]
                i += 2
            elif c == "$":
                val, i = var(i + 1)
                word += val
            else:
                word += c
                i += 1
        words.append(word)
    if words:
        cmds.append(words)
    return cmds
