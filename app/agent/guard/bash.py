"""The Bash check: one command line walked as bash would run it, every command in it checked.

It decides which shell syntax may appear at all (no functions, background jobs, arithmetic or `test -v`
on variables, C-style loops, unknown node kinds), checks every command anywhere in the tree (lists,
pipelines, subshells, groups, substitutions, loop and `if` bodies, here-documents) and every
redirection target and assignment, and sends each command to the rules for its name: wrappers and
toolchains come back through `argv` with their inner command, file commands and git get the path
check. A command name must be a literal word from the allowlist; network, privilege and container
tools and `eval` are denied whatever the allowlist says. It trusts words.py for what each word is,
paths.py for where a path may be, and tree-sitter-bash for the tree's shape (a tree with an error in
it is denied).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath

from tree_sitter import Node, Parser

from app.agent.guard import file_commands, git, wrappers
from app.agent.guard.check import Check
from app.agent.guard.commands import (
    ALWAYS_DENIED_COMMANDS,
    FILE_PROGRAMS,
    NO_PATH_COMMANDS,
    READ_COMMANDS,
    SHELLS,
    TOOLCHAINS,
    WRITE_COMMANDS,
    Via,
)
from app.agent.guard.denial import Denied, shorten
from app.agent.guard.options import literal_argument
from app.agent.guard.paths import PathCheck
from app.agent.guard.shell_builtins import IDENTIFIER, cd, cd_target, check_variable_name, no_path
from app.agent.guard.toolchains import RUNNERS, toolchain
from app.agent.guard.words import (
    Word,
    backtick_body,
    descendants,
    has_syntax_error,
    node_text,
    node_word,
    split_redirect,
)

MAX_NESTING = 4  # bash -c inside bash -c ... and backtick bodies, each re-parsed
MAX_WORKING_DIRECTORIES = 16  # candidate directories a command's `cd`s can leave it in
_SYSTEM_BIN_DIRS = ("/bin", "/usr/bin", "/usr/local/bin", "/sbin", "/usr/sbin")

_CONTAINERS = frozenset(
    {"program", "list", "pipeline", "subshell", "do_group", "if_statement", "elif_clause",
     "else_clause", "while_statement", "case_statement", "case_item", "negated_command",
     "variable_assignments", "array", "for_statement", "binary_expression", "unary_expression",
     "parenthesized_expression", "ternary_expression", "postfix_expression"}
)  # fmt: skip
_WORDISH = frozenset(
    {"word", "number", "string", "raw_string", "ansi_c_string", "translated_string", "concatenation",
     "string_content", "brace_expression", "variable_name", "special_variable_name", "heredoc_content",
     "regex", "extglob_pattern", "test_operator", "file_descriptor", "heredoc_start", "heredoc_end",
     "simple_expansion", "process_substitution", "command_name"}
)  # fmt: skip
_ARITHMETIC_OK = frozenset(
    {"number", "binary_expression", "unary_expression", "ternary_expression", "parenthesized_expression"}
)
_ARITHMETIC_TESTS = frozenset({"-eq", "-ne", "-lt", "-le", "-gt", "-ge"})
# tree-sitter-bash 0.25 crashes the process (SIGSEGV) on `{` before some code points past U+2FFFF
# (U+34000, U+E0100, U+F0100, ...), and a lone surrogate cannot be encoded: both are denied before parsing.
_UNPARSABLE = re.compile("[\ud800-\udfff\U00030000-\U0010ffff]")
_WRITE_REDIRECTS = frozenset({">", ">>", "&>", "&>>", ">|", ">&"})
_READ_REDIRECTS = frozenset({"<", "<&"})


class BashCheck:
    """One pass over one bash source: raises Denied at the first thing the policy does not allow."""

    def __init__(
        self, parser: Callable[[], Parser], paths: PathCheck, extra_commands: frozenset[str], depth: int = 0
    ) -> None:
        self.parser = parser
        self.paths = paths  # with every directory the shell may be in when a command runs
        self.extra_commands = extra_commands  # AGENT_ALLOWED_COMMANDS, checked as toolchains
        self.depth = depth

    # -- entry

    def source(self, text: str) -> None:
        if self.depth > MAX_NESTING:
            raise Denied(f"{shorten(text)}: shell code nested more than {MAX_NESTING} levels deep")
        if re.search(r"[^\s\\]\\\n[^\s]", text):
            raise Denied("a backslash-newline inside a word: bash joins the word, the policy cannot")
        if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", text):
            raise Denied("control characters in the command")
        if _UNPARSABLE.search(text):
            raise Denied("characters beyond U+2FFFF or lone surrogates in the command")
        root = self.parser().parse(text.encode()).root_node
        if has_syntax_error(root):
            raise Denied(f"could not parse {shorten(text)!r}: only complete, valid bash is allowed")
        self._collect_cd(root)
        self._walk(root)

    def nested(self, text: str) -> None:
        """Check shell code given as a string (`bash -c`, a backtick body), one level deeper."""
        paths = PathCheck(self.paths.worktree, list(self.paths.bases), read_only=self.paths.read_only)
        BashCheck(self.parser, paths, self.extra_commands, self.depth + 1).source(text)

    # -- the tree

    def _walk(self, node: Node) -> None:
        kind = node.type
        if not node.is_named:
            if kind == "&":
                raise Denied("background jobs (&) are not allowed; run the command in the foreground")
            return
        if kind in _CONTAINERS or kind in _WORDISH:
            if kind == "for_statement":
                if node.children and node.children[0].type == "select":
                    raise Denied("select reads from the terminal; not allowed")
                variable = node.child_by_field_name("variable")
                if variable is not None:
                    check_variable_name(node_text(variable))
            self._walk_children(node)
        elif kind == "compound_statement":
            if node.children and node.children[0].type == "((":
                self._arithmetic(node, "((...))")
            else:
                self._walk_children(node)
        elif kind == "command":
            self._command(node, [])
        elif kind == "redirected_statement":
            self._redirected(node)
        elif kind == "function_definition":
            raise Denied("defining shell functions is not allowed (a function can shadow an allowed name)")
        elif kind == "variable_assignment":
            self._assignment(node)
        elif kind == "declaration_command":
            self._declaration(node)
        elif kind == "unset_command":
            self._unset(node)
        elif kind == "test_command":
            self._test(node)
        elif kind == "expansion":
            self._expansion(node)
        elif kind == "subscript":
            self._subscript(node)
        elif kind == "arithmetic_expansion":
            self._arithmetic(node, "$((...))")
        elif kind == "c_style_for_statement":
            raise Denied("C-style for loops are not allowed (arithmetic on variables); use for x in ...")
        elif kind == "command_substitution":
            if node.children and node.children[0].type == "`":
                self.nested(backtick_body(node))
            else:
                self._walk_children(node)
        elif kind in ("file_redirect", "heredoc_redirect", "herestring_redirect"):
            for extra in self._redirect(node):
                self._walk(extra)
        elif kind == "heredoc_body":
            self._walk_children(node)
        elif kind == "comment":
            return
        else:
            raise Denied(f"unsupported shell syntax ({kind}) in {shorten(node_text(node))!r}")

    def _walk_children(self, node: Node) -> None:
        for child in node.children:
            self._walk(child)

    # -- statements

    def _redirected(self, node: Node) -> None:
        body = node.child_by_field_name("body") or node.named_children[0]
        extras: list[Node] = []
        for child in node.children:
            if child.id == body.id:
                continue
            if child.is_named:
                extras.extend(self._redirect(child))
            elif child.type == "&":
                raise Denied("background jobs (&) are not allowed; run the command in the foreground")
        if body.type == "command":
            self._command(body, extras)
            return
        if extras:
            raise Denied(f"words after a redirection of a compound command: {shorten(node_text(node))!r}")
        self._walk(body)

    def _redirect(self, node: Node) -> list[Node]:
        """Check one redirection; return the words tree-sitter hung on it that are really arguments."""
        extras: list[Node] = []
        if node.type == "herestring_redirect":
            self._walk_children(node)
            return extras
        if node.type == "heredoc_redirect":
            quoted = False
            for child in node.children:
                if child.type == "heredoc_start":
                    quoted = any(q in node_text(child) for q in "'\"\\")
                elif child.type == "heredoc_body":
                    if not quoted and "`" in node_text(child):
                        raise Denied("backticks in a here-document are not allowed; use $(...)")
                    self._walk(child)
                elif child.type == "file_redirect":
                    extras.extend(self._redirect(child))
                elif child.type in ("word", "string", "raw_string", "concatenation", "number"):
                    extras.append(child)
                else:
                    self._walk(child)
            return extras
        operator, target, extras = split_redirect(node)
        if target is None and operator in (">&-", "<&-"):  # closes a descriptor
            return extras
        if target is None:
            raise Denied(f"a redirection without a target: {shorten(node_text(node))!r}")
        if target.type == "process_substitution":
            self._walk(target)
            return extras
        self._walk(target)
        word = node_word(target)
        if operator in (">&", "<&") and word.text is not None and (word.text == "-" or word.text.isdigit()):
            return extras
        if operator in _WRITE_REDIRECTS:
            self.paths.write_path(word, f"redirect {operator}")
        elif operator in _READ_REDIRECTS:
            self.paths.read_path(word, f"redirect {operator}")
        else:
            raise Denied(f"unsupported redirection {operator!r}")
        return extras

    def _assignment(self, node: Node) -> None:
        name = node.child_by_field_name("name") or node.named_children[0]
        if name.type == "subscript":
            self._subscript(name)
            name = name.named_children[0]
        check_variable_name(node_text(name))
        for child in node.children[1:]:
            self._walk(child)

    def _declaration(self, node: Node) -> None:
        keyword = node.children[0].type
        for child in node.named_children:
            if child.type == "variable_assignment":
                self._assignment(child)
                continue
            if child.type == "variable_name":
                check_variable_name(node_text(child))
                continue
            text = literal_argument(node_word(child), keyword)
            if text.startswith(("-", "+")):
                if not set(text[1:]) <= set("xrpa"):
                    raise Denied(f"{keyword} {text}: only -x, -r, -a and -p are allowed")
                continue
            check_variable_name(text)

    def _unset(self, node: Node) -> None:
        for child in node.named_children:
            if child.type == "variable_name":
                continue
            word = node_word(child)
            if word.text in ("-v", "-f"):
                continue
            if word.text is None or not IDENTIFIER.fullmatch(word.text):
                raise Denied(f"unset {word.shown}: only plain variable names are allowed")

    def _test(self, node: Node) -> None:
        if node.children and node.children[0].type == "[":
            self.nested("test" + node_text(node)[1:-1])  # the same words, checked as the test builtin
            return
        for child in descendants(node):
            if child.type == "test_operator" and node_text(child) in ("-v", "-R"):
                raise Denied(f"test {node_text(child)} is not allowed (it evaluates array subscripts)")
            if child.type == "binary_expression":
                operators = [c for c in child.children if c.type == "test_operator"]
                if operators and node_text(operators[0]) in _ARITHMETIC_TESTS:
                    for operand in child.named_children:
                        if operand.type != "test_operator" and not node_text(operand).lstrip("-").isdigit():
                            raise Denied(
                                f"[[ {shorten(node_text(child))} ]]: arithmetic comparison of a variable "
                                "(bash evaluates its value as code); compare literal numbers or use = "
                            )
        self._walk_children(node)

    def _expansion(self, node: Node) -> None:
        children = node.children
        if len(children) > 1 and children[1].type == "!":
            raise Denied(f"indirect expansion {shorten(node_text(node))} is not allowed")
        for index, child in enumerate(children):
            if child.type == "@":
                raise Denied(f"the @ operator in {shorten(node_text(node))} is not allowed")
            if child.type == ":":
                following = children[index + 1] if index + 1 < len(children) else None
                if following is not None and following.is_named and following.type != "number":
                    raise Denied(f"substring offsets other than numbers: {shorten(node_text(node))}")
            if child.type == "subscript":
                self._subscript(child)
            elif child.is_named:
                self._walk(child)

    def _subscript(self, node: Node) -> None:
        index = node.child_by_field_name("index")
        if index is None:
            named = node.named_children
            index = named[1] if len(named) > 1 else None
        if index is not None and not (index.type == "number" or node_text(index) in ("@", "*")):
            raise Denied(f"array index {shorten(node_text(node))}: only literal numbers, @ and * are allowed")

    def _arithmetic(self, node: Node, what: str) -> None:
        for child in descendants(node):
            if child.is_named and child is not node and child.type not in _ARITHMETIC_OK:
                raise Denied(
                    f"{what} with variables or command output is not allowed "
                    f"(bash evaluates their values as code): {shorten(node_text(node))}"
                )

    # -- commands

    def _command_parts(self, node: Node) -> tuple[list[Node], Node | None, list[Node], list[Node]]:
        assignments: list[Node] = []
        arguments: list[Node] = []
        redirects: list[Node] = []
        name = node.child_by_field_name("name")
        for child in node.children:
            if name is not None and child.id == name.id:
                continue
            if child.type == "variable_assignment":
                assignments.append(child)
            elif child.type in ("file_redirect", "heredoc_redirect", "herestring_redirect"):
                redirects.append(child)
            elif child.type == "&":
                raise Denied("background jobs (&) are not allowed; run the command in the foreground")
            elif child.is_named and child.type != "comment":
                arguments.append(child)
        return assignments, name, arguments, redirects

    def _command(self, node: Node, extras: list[Node]) -> None:
        assignments, name, arguments, redirects = self._command_parts(node)
        for redirect in redirects:
            extras = [*extras, *self._redirect(redirect)]
        for assignment in assignments:
            self._assignment(assignment)
        if name is None:
            raise Denied(f"empty command {shorten(node_text(node))!r}")
        for child in (name, *arguments, *extras):
            self._walk(child)
        argv = [node_word(name), *(node_word(a) for a in (*arguments, *extras))]
        self.argv(argv, Via())

    def argv(self, argv: Sequence[Word], via: Via) -> None:
        """Check one simple command given as words; wrappers recurse with their inner command."""
        if not argv:
            return
        head = argv[0]
        if head.text is None:
            raise Denied(f"command name {head.shown} is an expansion; only literal command names run")
        name = head.text
        if not name:
            raise Denied("an empty command name")
        if head.glob or head.brace or head.tilde:
            raise Denied(f"command name {head.shown} would be expanded by the shell")
        if "/" in name:
            self._path_command(argv, via)
            return
        if name in ALWAYS_DENIED_COMMANDS:
            raise Denied(f"{name}: network, privilege and container tools are always denied")
        if name == "eval":
            raise Denied("eval: running a string as shell code is always denied")
        if (via.stdin_args or via.in_find) and not self._takes_unseen_arguments(name, via):
            raise Denied(
                f"{via.wrapper} {name}: arguments the policy cannot see could change what {name} does"
            )
        for word in argv[1:]:
            if word.glob:
                self.paths.glob_matches(word, name)
        if name in SHELLS:
            wrappers.shell(self, argv, via)
            return
        wrapper = _WRAPPERS.get(name)
        rule = _PATH_RULES.get(name)
        if wrapper is not None:
            wrapper(self, argv, via)
        elif rule is not None:
            rule(self.paths, argv, via)
        elif name in NO_PATH_COMMANDS:
            no_path(argv)
        elif name in READ_COMMANDS:
            file_commands.read_command(self.paths, argv, via)
        elif name in WRITE_COMMANDS:
            file_commands.write_command(self.paths, argv, via)
        elif name in TOOLCHAINS or name in self.extra_commands:
            self.runs_project_code(name)
            toolchain(self, argv, via)
        else:
            raise Denied(
                f"{name}: not on the command allowlist (an operator can add it with AGENT_ALLOWED_COMMANDS)"
            )

    def _takes_unseen_arguments(self, name: str, via: Via) -> bool:
        """Whether `name` stays safe when xargs or find -exec fills in arguments the policy cannot see.

        Not wrappers, git, runners (npx, uv run, ...) or cd: an unseen argument could become the program
        they run or the subcommand. File commands are fine under find, whose {} are paths under its
        checked start paths, but not under xargs.
        """
        if name in NO_PATH_COMMANDS or name in SHELLS:
            return True
        if name in TOOLCHAINS or name in self.extra_commands:
            return name not in RUNNERS and name != "corepack"
        return via.in_find and (name in READ_COMMANDS or name in WRITE_COMMANDS or name in FILE_PROGRAMS)

    def runs_project_code(self, what: str) -> None:
        if self.paths.read_only:
            raise Denied(f"{what}: runs project code, and this session is read-only")

    def _path_command(self, argv: Sequence[Word], via: Via) -> None:
        literal = argv[0].text or ""
        base = PurePosixPath(literal).name
        targets = [os.path.realpath(os.path.join(b, literal)) for b in self.paths.bases]
        names = {base, *(PurePosixPath(t).name for t in targets)}
        denied = names & ALWAYS_DENIED_COMMANDS
        if denied:
            raise Denied(f"{literal}: {min(denied)} is a network, privilege or container tool, always denied")
        if all(self.paths.worktree.inside(t) for t in targets):
            self.runs_project_code(literal)
            self.paths.paths_in(argv[1:], via, write=False, name=literal, only_pathlike=True)
            return  # a project script or binary
        lexical = [os.path.normpath(os.path.join(b, literal)) for b in self.paths.bases]
        system = {os.path.realpath(d) for d in _SYSTEM_BIN_DIRS}
        in_worktree = all(
            self.paths.worktree.inside(p) for p in lexical
        )  # e.g. .venv/bin/python -> /usr/bin/python3
        in_system = all(os.path.realpath(os.path.dirname(p)) in system for p in lexical)
        if in_worktree or in_system:
            self.argv([Word.literal(base), *argv[1:]], via)
            return
        raise Denied(f"{literal}: runs a program outside the worktree and the system bin directories")

    def _collect_cd(self, root: Node) -> None:
        """Every directory the commands may run in: the start and where each plain `cd` goes."""
        commands = [n for n in descendants(root) if n.type == "command"]
        for node in commands:
            _, name, arguments, _ = self._command_parts(node)
            if name is None or node_word(name).text != "cd":
                continue
            parent = node.parent
            extras: list[Node] = []
            if parent is not None and parent.type == "redirected_statement":
                for child in parent.children:
                    if child.type == "file_redirect":
                        extras += split_redirect(child)[2]
            target = cd_target([node_word(name), *(node_word(a) for a in (*arguments, *extras))])
            for directory in self.paths.cd_destinations(target):
                if directory not in self.paths.bases:
                    self.paths.bases.append(directory)
            if len(self.paths.bases) > MAX_WORKING_DIRECTORIES:
                raise Denied("too many cd commands in one command line")


# Commands whose rules read paths only, and commands that run another command (they get the check back).
_PATH_RULES: Mapping[str, Callable[[PathCheck, Sequence[Word], Via], None]] = {
    "cd": cd,
    "git": git.git,
    "grep": file_commands.grep,
    "rg": file_commands.grep,
    "sed": file_commands.sed,
    "awk": file_commands.awk,
    "jq": file_commands.jq,
    "sort": file_commands.sort,
    "uniq": file_commands.uniq,
    "xxd": file_commands.uniq,
    "tree": file_commands.tree,
}
_WRAPPERS: Mapping[str, Callable[[Check, Sequence[Word], Via], None]] = {
    "find": wrappers.find,
    "xargs": wrappers.xargs,
    "env": wrappers.env,
    "timeout": wrappers.timeout,
    "nice": wrappers.nice,
    "nohup": wrappers.nohup,
    "time": wrappers.time_command,
    "command": wrappers.command_builtin,
    "exec": wrappers.exec_command,
    "source": wrappers.source,
    ".": wrappers.source,
}
