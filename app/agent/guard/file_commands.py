"""The file commands and file programs: which of their words are paths, and which they read or write.

It decides the rules of the read commands (ls, cat, ...: every argument a path read, file-valued
options too), the write commands (cp, rm, ...: every argument a path written) and the file programs
grep, rg, sed, awk, jq, sort, uniq, xxd and tree, whose options are read as each reads them, from a
list of every long option each has. It trusts paths.py for where a path may be, and sed_awk.py for
what an inline program may do.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from app.agent.guard.commands import DELETE_COMMANDS, Via
from app.agent.guard.denial import Denied
from app.agent.guard.options import Syntax, parse_options, skip_options
from app.agent.guard.paths import PathCheck, pathlike
from app.agent.guard.sed_awk import awk_program_problem, check_program, sed_script_problem
from app.agent.guard.words import Word

# Options of read commands whose value is a file they read: (short letters, long names).
_READ_FILE_OPTIONS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "date": ("fr", ("--file", "--reference")),
    "file": ("fm", ("--files-from", "--magic-file")),
    "du": ("X", ("--exclude-from", "--files0-from")),
    "wc": ("", ("--files0-from",)),
    "diff": ("X", ("--exclude-from", "--from-file", "--to-file")),
    "hexdump": ("f", ()),
}

_SED_LONG_FLAGS = frozenset(
    {"--quiet", "--silent", "--regexp-extended", "--separate", "--null-data", "--unbuffered", "--posix",
     "--debug", "--sandbox", "--follow-symlinks", "--zero-terminated", "--line-length"}
)  # fmt: skip

# Every long option of each command (GNU coreutils 9, sed 4.9, grep 3, ripgrep 14, tree 2, jq 1.6-1.7),
# so that an abbreviation resolves as the command resolves it and an unknown option is denied.

_SORT_SYNTAX = Syntax(
    long_flags=frozenset(
        {"--ignore-leading-blanks", "--dictionary-order", "--ignore-case", "--general-numeric-sort",
         "--ignore-nonprinting", "--month-sort", "--human-numeric-sort", "--numeric-sort", "--random-sort",
         "--reverse", "--version-sort", "--check", "--debug", "--merge", "--stable", "--unique",
         "--zero-terminated", "--help", "--version"}
    ),
    long_valued=frozenset(
        {"--random-source", "--sort", "--batch-size", "--compress-program", "--files0-from", "--key",
         "--output", "--buffer-size", "--field-separator", "--temporary-directory", "--parallel"}
    ),
    short_valued="koTtSy",
)  # fmt: skip
_SED_SYNTAX = Syntax(
    long_flags=frozenset(
        {"--quiet", "--silent", "--debug", "--follow-symlinks", "--in-place", "--posix", "--regexp-extended",
         "--separate", "--sandbox", "--unbuffered", "--null-data", "--zero-terminated", "--binary", "--help",
         "--version"}
    ),
    long_valued=frozenset({"--expression", "--file", "--line-length"}),
    short_valued="efl",
    short_optional="i",
)  # fmt: skip
_GREP_SYNTAX = Syntax(
    long_flags=frozenset(
        {"--extended-regexp", "--fixed-strings", "--fixed-regexp", "--basic-regexp", "--perl-regexp",
         "--ignore-case", "--no-ignore-case", "--word-regexp", "--line-regexp", "--null-data",
         "--no-messages", "--invert-match", "--version", "--help", "--byte-offset", "--line-number",
         "--line-buffered", "--with-filename", "--no-filename", "--only-matching", "--quiet", "--silent",
         "--text", "--recursive", "--dereference-recursive", "--files-without-match",
         "--files-with-matches", "--count", "--initial-tab", "--null", "--binary", "--unix-byte-offsets",
         "--no-group-separator", "--color", "--colour"}
    ),
    long_valued=frozenset(
        {"--regexp", "--file", "--max-count", "--label", "--binary-files", "--devices", "--directories",
         "--exclude", "--exclude-from", "--exclude-dir", "--include", "--before-context",
         "--after-context", "--context", "--group-separator"}
    ),
    short_valued="efABCmdD",
)  # fmt: skip
_RG_SYNTAX = Syntax(
    long_flags=frozenset(
        {"--help", "--version", "--pcre2-version", "--line-buffered", "--no-line-buffered",
         "--block-buffered", "--no-block-buffered", "--ignore-case", "--case-sensitive", "--smart-case",
         "--column", "--no-column", "--count", "--count-matches", "--include-zero", "--no-include-zero",
         "--no-encoding", "--files-with-matches", "--files-without-match", "--with-filename",
         "--no-filename", "--one-file-system", "--no-one-file-system", "--fixed-strings",
         "--no-fixed-strings", "--follow", "--no-follow", "--glob-case-insensitive",
         "--no-glob-case-insensitive", "--heading", "--no-heading", "--hidden", "--no-hidden",
         "--auto-hybrid-regex", "--no-auto-hybrid-regex", "--ignore", "--no-ignore",
         "--ignore-file-case-insensitive", "--no-ignore-file-case-insensitive", "--ignore-exclude",
         "--no-ignore-exclude", "--ignore-global", "--no-ignore-global", "--ignore-parent",
         "--no-ignore-parent", "--ignore-vcs", "--no-ignore-vcs", "--require-git", "--no-require-git",
         "--ignore-dot", "--no-ignore-dot", "--ignore-files", "--no-ignore-files", "--json", "--no-json",
         "--line-number", "--no-line-number", "--crlf", "--no-crlf", "--null-data",
         "--max-columns-preview", "--no-max-columns-preview", "--messages", "--no-messages",
         "--ignore-messages", "--no-ignore-messages", "--mmap", "--no-mmap", "--multiline",
         "--no-multiline", "--multiline-dotall", "--no-multiline-dotall", "--only-matching", "--passthru",
         "--passthrough", "--pcre2", "--no-pcre2", "--pcre2-unicode", "--no-pcre2-unicode", "--no-pre",
         "--pretty", "--vimgrep", "--sort-files", "--no-sort-files", "--stats", "--no-stats", "--text",
         "--no-text", "--binary", "--no-binary", "--trim", "--no-trim", "--type-list", "--word-regexp",
         "--line-regexp", "--unicode", "--no-unicode", "--search-zip", "--no-search-zip", "--byte-offset",
         "--no-byte-offset", "--no-context-separator", "--debug", "--trace", "--files", "--invert-match",
         "--no-invert-match", "--no-config", "--null", "--quiet", "--unrestricted", "--stop-on-nonmatch"}
    ),
    long_valued=frozenset(
        {"--after-context", "--before-context", "--context", "--encoding", "--engine", "--file",
         "--generate", "--glob", "--iglob", "--max-depth", "--maxdepth", "--pre", "--pre-glob", "--regexp",
         "--replace", "--sort", "--sortr", "--threads", "--type", "--type-add", "--type-clear",
         "--type-not", "--color", "--colors", "--context-separator", "--field-context-separator",
         "--field-match-separator", "--hostname-bin", "--hyperlink-format", "--dfa-size-limit",
         "--ignore-file", "--max-columns", "--max-count", "--max-bytes", "--max-filesize",
         "--path-separator", "--regex-size-limit"}
    ),
    short_valued="efABCmdDgtTjMEr",
    abbreviations=False,
)  # fmt: skip
# tree parses its own arguments: long options whole, and a valued letter takes the next word while the
# rest of its cluster goes on (`-Lo 2 out`: level 2, output to out), or the digits right after it.
_TREE_SYNTAX = Syntax(
    long_flags=frozenset(
        {"--help", "--version", "--inodes", "--device", "--noreport", "--nolinks", "--dirsfirst",
         "--filesfirst", "--si", "--du", "--prune", "--ignore-case", "--matchdirs", "--fromtabfile",
         "--fromfile", "--metafirst", "--gitignore", "--info", "--fflinks", "--hyperlink", "--opt-toggle",
         "--condense", "--acl", "--selinux"}
    ),
    long_valued=frozenset(
        {"--filelimit", "--charset", "--timefmt", "--sort", "--gitfile", "--infofile", "--hintro",
         "--houtro", "--scheme", "--authority", "--compress"}
    ),
    short_next="oLPIHT",
    abbreviations=False,
)  # fmt: skip
_JQ_SYNTAX = Syntax(
    long_flags=frozenset(
        {"--seq", "--stream", "--stream-errors", "--slurp", "--raw-input", "--null-input",
         "--compact-output", "--tab", "--color-output", "--monochrome-output", "--ascii-output",
         "--unbuffered", "--sort-keys", "--raw-output", "--raw-output0", "--join-output", "--nul-output",
         "--exit-status", "--binary", "--args", "--jsonargs", "--from-file", "--debug-dump-disasm",
         "--debug-trace", "--help", "--version", "--build-configuration"}
    ),
    long_valued=frozenset({"--indent", "--library-path"}),
    long_paired=frozenset({"--arg", "--argjson", "--slurpfile", "--rawfile", "--argfile"}),
    short_valued="L",
    abbreviations=False,
)  # fmt: skip


def _option_files(paths: PathCheck, argv: Sequence[Word]) -> None:
    """Read paths given as option values (`date -f/etc/passwd` prints each line in an error)."""
    name = argv[0].text or ""
    letters, long_names = _READ_FILE_OPTIONS.get(name, ("", ()))
    for word in argv[1:]:
        text = word.text or ""
        if text == "--":
            return
        written, eq, value = text.partition("=")
        if text.startswith("--") and eq and any(o.startswith(written) for o in long_names):
            paths.read_path(Word.literal(value), f"{name} {written}")  # abbreviations included
        elif text.startswith("-") and not text.startswith("--"):
            rest = text[1:]
            for index, letter in enumerate(rest):
                if letter in letters and rest[index + 1 :]:
                    paths.read_path(Word.literal(rest[index + 1 :]), f"{name} -{letter}")


def read_command(paths: PathCheck, argv: Sequence[Word], via: Via) -> None:
    """Every argument of a read command (ls, cat, diff, ...) is a path it reads, option values too."""
    _option_files(paths, argv)
    paths.paths_in(argv[1:], via, write=False, name=argv[0].text or "")


def write_command(paths: PathCheck, argv: Sequence[Word], via: Via) -> None:
    """Every argument of a write command (cp, mv, rm, ...) is a path it may write (`-tDIR` too)."""
    name = argv[0].text or ""
    words: list[Word] = []
    for word in argv[1:]:
        text = word.text or ""
        if name in ("cp", "mv", "ln") and text.startswith("-t") and len(text) > 2:
            words.append(Word.literal(text[2:]))
        else:
            words.append(word)
    delete_tree = via.in_find and name in DELETE_COMMANDS
    paths.paths_in(words, via, write=True, name=name, delete_tree=delete_tree)


def grep(paths: PathCheck, argv: Sequence[Word], via: Via) -> None:
    """grep and rg: the pattern is not a path; files read by -f and --exclude-from are."""
    name = argv[0].text or "grep"
    ripgrep = name == "rg"
    options, operands = parse_options(name, argv[1:], _RG_SYNTAX if ripgrep else _GREP_SYNTAX)
    pattern_given = False
    for option in options:
        if ripgrep and option.name in ("--pre", "--pre-glob", "--hostname-bin"):
            raise Denied(f"rg {option.name} runs a command; not allowed")
        if option.name in ("-e", "-f", "--regexp", "--file", "--files"):  # rg --files: no pattern
            pattern_given = True
        if option.name in ("-f", "--file", "--exclude-from", "--ignore-file"):
            paths.read_path(option.path, f"{name} {option.name}")
        elif option.name.startswith("--") and option.attached and pathlike(option.attached):
            paths.read_path(option.path, name)
    if not pattern_given and operands:
        operands = operands[1:]
    paths.operand_paths(operands, via, write=False, name=name)


def sed(paths: PathCheck, argv: Sequence[Word], via: Via) -> None:
    """sed: only inline scripts, checked by sed_awk; `-i` makes the files written."""
    options, operands = parse_options("sed", argv[1:], _SED_SYNTAX)
    scripts: list[Word] = []
    in_place = False
    for option in options:
        if option.name in ("-e", "--expression"):
            if option.value is not None:
                scripts.append(option.value)
        elif option.name in ("-i", "--in-place"):
            in_place = True
            if "/" in (option.attached or ""):
                raise Denied(f"sed {option.name} with a backup suffix containing '/' is not allowed")
        elif option.name == "-f":
            raise Denied("sed -f: scripts from files are not inspected; pass the script inline")
        elif option.name.startswith("--"):
            if option.name not in _SED_LONG_FLAGS:
                raise Denied(f"sed {option.name}: option not allowed")
        elif option.name[1] not in "nErsuzl":
            raise Denied(f"sed {option.name}: option not allowed")
    if not scripts and operands:
        scripts, operands = [operands[0]], operands[1:]
    for script in scripts:
        check_program(script, "a sed script", sed_script_problem)
    paths.operand_paths(operands, via, write=in_place, name="sed -i" if in_place else "sed")


def awk(paths: PathCheck, argv: Sequence[Word], via: Via) -> None:
    """awk: one inline program, checked by sed_awk; `name=value` operands are assignments, not files."""
    why = "option not allowed (program files and extensions are not inspected)"
    i = skip_options(argv, (), {"-F", "-v"}, why=why)
    if i >= len(argv):
        return
    check_program(argv[i], "an awk program", awk_program_problem)
    files = [w for w in argv[i + 1 :] if not (w.text and re.fullmatch(r"[A-Za-z_]\w*=.*", w.text, re.S))]
    paths.operand_paths(files, via, write=False, name="awk")


def jq(paths: PathCheck, argv: Sequence[Word], via: Via) -> None:
    """jq: an inline filter that loads nothing; the files named by --slurpfile and --rawfile are read."""
    options, operands = parse_options("jq", argv[1:], _JQ_SYNTAX)
    for option in options:
        if option.name in ("-f", "--from-file", "-L", "--library-path"):
            raise Denied(f"jq {option.name}: filters from files and module paths are not inspected")
        if option.name in ("--slurpfile", "--rawfile", "--argfile"):
            paths.read_path(option.path, f"jq {option.name}")
    if operands:  # the filter; the rest are input files (or, after --args, strings checked as files)
        program = operands.pop(0)
        if program.text is None or program.placeholder:
            raise Denied(f"jq filter {program.shown} is not a literal")
        if re.search(r"\b(import|include)\b", program.text):
            raise Denied("jq import/include loads files the policy cannot see")
    paths.operand_paths(operands, via, write=False, name="jq")


def sort(paths: PathCheck, argv: Sequence[Word], via: Via) -> None:
    """sort: no helper programs or file lists; -o and -T are written, --random-source is read."""
    options, operands = parse_options("sort", argv[1:], _SORT_SYNTAX)
    for option in options:
        if option.name == "--compress-program":
            raise Denied("sort --compress-program runs a command; not allowed")
        if option.name == "--files0-from":
            raise Denied("sort --files0-from reads the files to sort from a list; name them instead")
        if option.name in ("-o", "-T", "--output", "--temporary-directory"):
            paths.write_path(option.path, f"sort {option.name}")
        elif option.name == "--random-source":
            paths.read_path(option.path, "sort --random-source")
    paths.operand_paths(operands, via, write=False, name="sort")


def uniq(paths: PathCheck, argv: Sequence[Word], via: Via) -> None:
    """uniq and xxd: the second operand is an output file, so every path is checked as written."""
    paths.paths_in(argv[1:], via, write=True, name=argv[0].text or "uniq")


def tree(paths: PathCheck, argv: Sequence[Word], via: Via) -> None:
    """tree: -o is written, --gitfile and its kin are read, and -R (which writes everywhere) is denied."""
    options, operands = parse_options("tree", argv[1:], _TREE_SYNTAX)
    for option in options:
        if option.name == "-R":
            raise Denied("tree -R writes a 00Tree.html into every directory past the -L level")
        if option.name == "-o":
            paths.write_path(option.path, "tree -o")
        elif option.name in ("--gitfile", "--infofile", "--hintro", "--houtro"):
            paths.read_path(option.path, f"tree {option.name}")
    paths.operand_paths(operands, via, write=False, name="tree")
