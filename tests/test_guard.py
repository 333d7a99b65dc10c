"""The agent policy: every bypass form of Bash, the file tools, the hook's output shape, the environment."""

from __future__ import annotations

import asyncio
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from claude_agent_sdk import (
    ClaudeAgentOptions,
    ClaudeSDKError,
    HookMatcher,
    PreToolUseHookSpecificOutput,
    ResultMessage,
    query,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tree_sitter import Parser

from app.agent.guard import (
    ALWAYS_DENIED_COMMANDS,
    DEFAULT_ALLOWED_COMMANDS,
    AgentPolicy,
    Decision,
    PolicyConfig,
    agent_environment,
    hook_matchers,
    is_ci_config_path,
    is_denied_env_name,
    pre_tool_use_hook,
)
from app.demo.model_server import Script, ScriptedModelServer, ToolCall, Turn
from app.errors import ConfigError
from tests.agent_env import agent_env


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    """A worktree with sources, CI configuration, a .git file, a project script and a symlink to /etc."""
    root = tmp_path / "worktree"
    (root / "src").mkdir(parents=True)
    (root / "src" / "app.py").write_text("print('hi')\n")
    (root / ".github" / "workflows").mkdir(parents=True)
    (root / ".github" / "workflows" / "ci.yml").write_text("on: push\n")
    (root / ".git").write_text("gitdir: ../clone/.git/worktrees/wt\n")  # a worktree's .git is a file
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "package.json").write_text('{"scripts": {"lint": "eslint ."}}\n')
    (root / "etc_link").symlink_to("/etc")
    (tmp_path / "outside.txt").write_text("not yours\n")
    return root.resolve()


@pytest.fixture
def policy(worktree: Path) -> AgentPolicy:
    return AgentPolicy(PolicyConfig(worktree=worktree))


# --- Bash: allowed ----------------------------------------------------------------------------------

ALLOWED = [
    "ls -la",
    "ls -la src | head -20",
    "cat src/app.py",
    "cat src/app.py | grep hi | wc -l",
    "head -n 20 src/app.py; tail -5 src/app.py",
    "wc -l src/*.py",
    "grep -rn 'def ' src",
    'grep -rn "/api/v1" --include="*.py" src',
    "grep -e /api/ -r src",
    "rg -n TODO src",
    "find src -name '*.py'",
    "find . -name '*.pyc' -delete",
    "find src -name '*.pyc' -exec rm {} +",
    "find src -type f -exec sh -c 'echo \"$1\"' _ {} \\;",
    "sed -n '1,20p' src/app.py",
    "sed -i 's/hi/hello/' src/app.py",
    "sed -i.bak -e 's/a/b/' -e 's/c/d/' src/app.py",
    "sed -E 's/(a|b)+/x/g' src/app.py",
    "awk -F: '{print $1}' src/app.py",
    "awk '{ if ($1 > 3) print $1 }' src/app.py",
    "sort src/app.py | uniq -c | sort -rn | head",
    "jq -r '.scripts | keys[]' package.json",
    "diff -u src/app.py run.sh",
    "realpath src/app.py && stat src/app.py && file src/app.py",
    "tree -L 2 src",
    "echo hello > notes.txt 2>/dev/null",
    "echo hello >> notes.txt",
    "echo hello | tee -a notes.txt",
    "ls &> listing.txt",
    "ls 2>&1 | head",
    "ls >&2",
    "ls 3>&- 2>&1",
    "cat src/app.py > /dev/null 2>&1",
    "mkdir -p src/new/pkg && touch src/new/pkg/__init__.py",
    "cp src/app.py src/app_copy.py && mv src/app_copy.py src/moved.py",
    "rm -rf src/new",
    "rm -f src/*.pyc",
    "chmod +x run.sh",
    "ln -s src/app.py app_link.py",
    "cat > src/new.py <<'EOF'\nprint($(this is text))\nEOF",
    "cat <<EOF > notes.md\nhello $HOME\nEOF",
    "git status",
    "git diff HEAD~1 -- src",
    "git diff --stat main...HEAD",
    "git log --oneline -5",
    "git log -p --follow -- src/app.py",
    "git log --format='%H %s' -n 3",
    "git show HEAD:src/app.py",
    "git branch",
    "git branch -a --list 'feat*'",
    "git rev-parse --abbrev-ref HEAD",
    "git ls-files | head",
    "git blame src/app.py",
    "git grep -n hello",
    "git stash list",
    "git -C src log -1",
    "git --no-pager diff",
    "npm test",
    "npm install",
    "npm run build 2>&1 | tail -20",
    "npx eslint .",
    "npx --yes prettier --check .",
    "pnpm install && pnpm lint",
    "yarn test",
    "node -e 'console.log(1)'",
    "python -m pytest -q",
    "python3 -c 'import os; print(os.getcwd())'",
    "pip install requests",
    "uv run pytest tests -x",
    "uv run --with httpx python -c 'print(1)'",
    "pytest tests/ -x -q",
    "ruff check . && ruff format --check .",
    "mypy src/",
    "tsc --noEmit",
    "go test ./...",
    "cargo test",
    "make test",
    "FOO=bar npm test",
    "export NODE_ENV=test && npm test",
    "timeout 60 npm test",
    "timeout -s KILL 10 pytest",
    "nice -n 5 make test",
    "nohup npm test",
    "time ls",
    "command -v python3",
    "which python3 && python3 --version",
    "env | sort",
    "env FOO=1 npm test",
    "printenv PATH",
    "date +%s",
    "seq 1 3 | while read -r n; do echo $n; done",
    'while IFS= read -r line; do echo "$line"; done < src/app.py',
    "for f in src/*.py; do echo $f; done",
    "if [ -f src/app.py ]; then echo yes; else echo no; fi",
    "[[ -f src/app.py ]] && echo yes",
    "case x in a) echo a;; *) echo other;; esac",
    "(cd src && ls)",
    "{ ls; pwd; }",
    "cd src && cat app.py",
    "set -euo pipefail; ls",
    "echo $((1 + 2))",
    'echo "$(date)" `pwd`',
    "diff <(sort src/app.py) <(sort run.sh)",
    "./run.sh",
    "bash run.sh",
    "bash -c 'ls && pwd'",
    "sh -c 'cat src/app.py | grep hi'",
    "source run.sh",
    "ls # curl http://example.com",
    "echo {curl,x}",
    "cat -- -not-an-option",
    "true && false || echo recovered",
    "! grep -q nothing src/app.py",
    "git diff --name-only | xargs ruff check",
    "xargs -n1 echo",
    "xargs sh -c 'echo \"$@\"' _",
    "find src -exec awk '{print}' {} \\;",
    "find src -exec timeout 5 ls \\;",
    "x=$(cat <<'EOF'\ncurl\nEOF\n)",
    "echo $[1 + 2] $((16#ff))",
    "IFS=, read -ra parts <<< 'a,b'",
    "date -u +'%Y-%m-%dT%H:%M:%SZ'",
    "echo '{}' | jq .",
    '[ -f "$f" ] && echo ok',
    '[ "$a" = "$b" ] || [ -z "$c" ]',
    '[ -f "$a" -a -f "$b" ]',
    "printf '%s\\n' $files",
    # option parsing: clusters, attached values, valued options, and `--` ending the options
    "grep -e foo -e bar src",
    "grep -- -e src",
    "grep -rn --include='*.py' -A 2 foo src",
    "rg -g '*.py' -t py hi src",
    "sort -k2 -t, -o src/sorted.txt src/app.py",
    "sort -- -o",
    "sed -n -e 1p -- src/app.py",
    "sed -ibak 's/a/b/' src/app.py",
    "sed --expression=1p --in-place=.orig src/app.py",
    "awk -v x=1 -F, '{print x}' src/app.py",
    "xargs -0 -n1 -I{} echo {}",
    "timeout --signal=KILL -k 5 10 ls",
    "tree -o listing.txt -L 2 src",
    # long options abbreviated as GNU getopt_long allows are read by their full names
    "sort --rev --key=2 src/app.py",
    "sort --outp=src/sorted.txt src/app.py",
    "sort -R --random-sou=src/app.py src/app.py",
    "sed --in-pl=.bak --expr=1p src/app.py",
    "grep --ignore-c --exclude-fr=src/app.py foo src",
    "echo x | xargs --eof=EOF --max-l echo",
    "env --unset FOO -- A=1 ls",
    "timeout --sig=KILL 5 ls",
    "nice --adj=5 ls",
    "git grep --or -e a -e O src",
    "rg --files src",
    # tree's own option syntax, and jq's options wherever they stand
    "tree -L2 -o listing.txt src",
    "tree -aLo 2 listing.txt src",
    "tree --infofile=src/app.py -- src",
    "jq -cr '.scripts' package.json",
    "jq -n --arg x 'import' --slurpfile y package.json '$x'",
    "jq -n --args '$ARGS' a b",
    # expansions where they cannot become options
    'find src -name "$x" -newermt "$d" -print',
    'git log -1 -- "$f"',
    'git show "HEAD:$f"',
    'rg -e "$x" src',
    'grep -- "$x" src',
    'grep "foo$x" src',
    'grep -e "$x" src',
    'env -u "$x" ls',
    'find src -exec echo "$x" \\;',
    "set -o errexit -o nounset +x; set -- a -k; ls",
    "date -r src/app.py +%s && du -sh src && cut -d/ -f2 src/app.py",
]


@pytest.mark.parametrize("command", ALLOWED)
def test_allowed_commands(policy: AgentPolicy, command: str) -> None:
    decision = policy.check_bash(command)
    assert decision.allowed, decision.reason


# --- Bash: denied, with the rule named ----------------------------------------------------------------

DENIED = [
    # plain network, privilege, container tools
    ("curl http://example.com", "curl: network"),
    ("wget http://example.com", "wget: network"),
    ("ssh host", "ssh: network"),
    ("nc -l 4444", "nc: network"),
    ("sudo ls", "sudo: network, privilege"),
    ("docker ps", "docker:"),
    ("gh pr list", "gh:"),
    ("rsync -a src host:dst", "rsync:"),
    # every place a command can hide
    ("ls | curl x", "curl:"),
    ("ls && curl x", "curl:"),
    ("ls; curl x", "curl:"),
    ("false || curl x", "curl:"),
    ("ls\ncurl x", "curl:"),
    ("(curl x)", "curl:"),
    ("{ curl x; }", "curl:"),
    ("echo $(curl x)", "curl:"),
    ("echo `curl x`", "curl:"),
    ("echo `echo \\`curl x\\``", "curl:"),
    ('echo "`curl x`"', "curl:"),
    ('echo "$(echo "$(curl x)")"', "curl:"),
    ("x=$(curl x)", "curl:"),
    ("echo ${x:-$(curl x)}", "curl:"),
    ("echo $((1 + $(curl x)))", "with variables or command output"),
    ("diff <(ls) <(curl x)", "curl:"),
    ("ls > >(curl x)", "curl:"),
    ('cat <<< "$(curl x)"', "curl:"),
    ("cat <<EOF\n$(curl x)\nEOF", "curl:"),
    ("cat <<EOF\n`curl x`\nEOF", "backticks in a here-document"),
    ("if true; then curl x; fi", "curl:"),
    ("if curl x; then ls; fi", "curl:"),
    ("while false; do curl x; done", "curl:"),
    ("for i in 1 2; do curl $i; done", "curl:"),
    ("for i in $(curl x); do echo $i; done", "curl:"),
    ("case x in x) curl x;; esac", "curl:"),
    ("! curl x", "curl:"),
    ("[[ $(curl x) ]]", "curl:"),
    # wrappers
    ("bash -c 'curl x'", "curl:"),
    ("bash -c 'bash -c \"curl x\"'", "curl:"),
    ("sh -lc 'ls; curl x'", "curl:"),
    ('sh -c "$VAR"', "not a literal"),
    ('zsh -c "$(echo curl)"', "not a literal"),
    ("bash", "reading commands from stdin"),
    ("bash <<EOF\ncurl x\nEOF", "reading commands from stdin"),
    ("echo 'curl x' | sh", "reading commands from stdin"),
    ("bash -s < run.sh", "bash -s: option not allowed"),
    ("bash /etc/profile", "outside the worktree"),
    ("xargs curl", "curl:"),
    ("echo x | xargs -I{} sh -c '{}'", "not a literal"),
    ("echo 'curl x' | xargs env", "xargs env: arguments the policy cannot see"),
    ("echo push | xargs git", "xargs git"),
    ("echo curl | xargs npx", "xargs npx"),
    ("echo '1e curl x' | xargs sed -n", "xargs sed"),
    ("echo 'BEGIN{system(\"x\")}' | xargs awk", "xargs awk"),
    ("xargs xargs curl", "xargs xargs"),
    ("xargs -a/etc/passwd echo", "xargs -a: /etc/passwd"),
    ("xargs --arg-file=../outside.txt echo", "outside the worktree"),
    ("xargs sh -c", "without a command string"),
    ("find src -exec env {} \\;", "find -exec env"),
    ("find src -exec git log {} \\;", "find -exec git"),
    ("find ls -exec bash -c {} \\;", "file names would run as shell code"),
    ("find src -exec awk {} \\;", "file names would run as an awk program"),
    ("find src -exec sed {} \\;", "file names would run as a sed script"),
    (". /dev/stdin <<< 'curl x'", "device or process file"),
    ("source <(printf 'curl x')", "device or process file"),
    ("bash /dev/stdin <<< 'curl x'", "device or process file"),
    ("bash <(echo curl x)", "device or process file"),
    ("jq 'import \"x\" as $x; .' package.json", "jq import"),
    ("jq -f filter.jq package.json", "jq -f"),
    ("jq --rawfile x /etc/passwd -n '$x'", "outside the worktree"),
    ("date -f /etc/passwd", "outside the worktree"),
    ("echo $[x]", "with variables"),
    ("find . -exec curl {} \\;", "curl:"),
    ("find . -exec sh -c 'echo {}' \\;", "not a literal"),
    ("find . -execdir ls \\;", "-execdir"),
    ("find -L . -name x", "find -L"),
    ("env X=1 curl x", "curl:"),
    ("env -i curl x", "curl:"),
    ("env -S 'curl x'", "env -S: option not allowed"),
    ("env 'BASH_FUNC_ls%%=() { curl x; }' bash -c ls", "not a plain identifier"),
    ("timeout 5 curl x", "curl:"),
    ("nice -n 5 curl x", "curl:"),
    ("nohup curl x", "curl:"),
    ("time curl x", "curl:"),
    ("command curl x", "curl:"),
    ("exec curl x", "curl:"),
    ("sudo -u root ls", "sudo:"),
    ("uv run curl x", "curl:"),
    ("npx curl", "curl:"),
    ("npm exec -- curl x", "curl:"),
    ("npx -c 'curl x'", "npx -c: option not allowed"),
    ("pnpm curl x", "curl:"),
    ("corepack curl", "corepack: only"),
    # names that hide a command
    ("/usr/bin/curl x", "curl is a network"),
    ("./../../usr/bin/curl x", "curl is a network"),
    ("c\\url x", "curl:"),
    ("'curl' x", "curl:"),
    ("'c'url x", "curl:"),
    ('"cu""rl" x', "curl:"),
    ("cu''rl x", "curl:"),
    ("$'\\x63url' x", "curl:"),
    ("$'\\143url' x", "curl:"),
    ("$CMD x", "is an expansion"),
    ("${CMD} x", "is an expansion"),
    ("$(echo curl) x", "is an expansion"),
    ('"$CMD" x', "is an expansion"),
    ("/usr/bin/cur? x", "would be expanded"),
    ("/usr/bin/c*rl x", "would be expanded"),
    ("{curl,x}", "could not parse"),
    ("cu\\\nrl x", "backslash-newline inside a word"),
    ("сurl x", "not on the command allowlist"),  # Cyrillic с
    ("ｃｕｒｌ x", "not on the command allowlist"),  # fullwidth
    ("curl\u200b x", "not on the command allowlist"),  # zero-width space
    ("'' x", "empty command name"),
    ("/opt/tool/bin/thing", "outside the worktree and the system bin"),
    ("terraform apply", "terraform: not on the command allowlist"),
    ("python3.11 -c 1", "not on the command allowlist"),
    # background, eval, source, exec, functions
    ("nohup curl x &", "curl:"),
    ("nohup npm test &", "background jobs"),
    ("sleep 10 &", "background jobs"),
    ("npm start & sleep 1", "background jobs"),
    ("eval ls", "eval: running a string"),
    ("eval 'curl x'", "eval:"),
    ("source /etc/profile", "outside the worktree"),
    (". ~/.bashrc", "home directory"),
    ("exec > out.log", "exec without a command"),
    ("exec 3>/etc/x", "outside the worktree"),
    ("f() { ls; }; f", "defining shell functions"),
    ("function f { ls; }", "defining shell functions"),
    # redirections
    ("echo hi > /etc/x", "redirect >: /etc/x"),
    ("echo hi > ~/.bashrc", "home directory"),
    ("echo hi >> ../outside.txt", "outside the worktree"),
    ("ls >& /etc/x", "outside the worktree"),
    ("ls &> /tmp/out", "outside the worktree"),
    ("echo x > /dev/tcp/127.0.0.1/80", "outside the worktree"),
    ("cat < /etc/passwd", "redirect <: /etc/passwd"),
    ('echo hi > "$(echo /etc/x)"', "not a literal path"),
    ("echo hi > etc_link/x", "outside the worktree"),
    ("rm > /dev/null /etc/x", "rm: /etc/x"),
    ("echo x > .github/workflows/ci.yml", "CI configuration"),
    ("echo x > .git/config", "inside .git"),
    # paths of file commands
    ("cat /etc/passwd", "cat: /etc/passwd"),
    ("cat /proc/1/environ", "outside the worktree"),
    ("cat ../outside.txt", "outside the worktree"),
    ("cat src/../../outside.txt", "outside the worktree"),
    ("cat etc_link/passwd", "outside the worktree"),
    ("cat ~/.ssh/id_rsa", "home directory"),
    ("cat {src,/etc}/passwd", "brace expansion"),
    ("cat $(echo /etc/passwd)", "not a literal path"),
    ("cat $HOME/.bashrc", "not a literal path"),
    ("ls /usr/bin", "outside the worktree"),
    ("ls ..", "outside the worktree"),
    ("rm -rf /", "rm: /"),
    ("rm -rf .", "worktree root itself"),
    ("rm -rf .*", "can match '..'"),
    ("rm -rf ../*", "outside the worktree"),
    ("chmod 777 etc_*", "outside the worktree"),
    ("cp src/app.py /tmp/", "outside the worktree"),
    ("cp --target-directory=.github/workflows src/app.py", "CI configuration"),
    ("mv -t .github/workflows src/app.py", "CI configuration"),
    ("mv src/app.py .github/workflows/", "CI configuration"),
    ("mv .github old-github", "CI configuration"),
    ("ln -s /etc/passwd passwd", "outside the worktree"),
    ("touch .git/hooks/pre-commit", "inside .git"),
    ("mkdir -p /tmp/x", "outside the worktree"),
    ("tee /etc/x < src/app.py", "outside the worktree"),
    ("find / -name id_rsa", "find: /"),
    ("grep -r password /etc", "outside the worktree"),
    ("grep -f /etc/passwd src/app.py", "outside the worktree"),
    ("find . -name '*.py' | xargs grep foo", "xargs grep"),
    ("git ls-files | xargs rm", "xargs rm"),
    ("find . -name '*.py' -exec sed -i 's/a/b/' {} +", "worktree root itself"),
    ("sort -o /tmp/x src/app.py", "sort -o"),
    ("sort -ro /tmp/x src/app.py", "sort -o"),
    ("sort --compress-program=curl src/app.py", "compress-program"),
    ("tree -o /tmp/x", "tree -o"),
    ("uniq src/app.py .github/workflows/ci.yml", "CI configuration"),
    ("git diff --output=/tmp/x", "git diff --output"),
    ("make -C /tmp", "outside the worktree"),
    ("python /tmp/x.py", "outside the worktree"),
    ("rg --pre curl foo", "rg --pre"),
    # sed and awk programs that run commands or write files
    ("sed -n '1e curl x' src/app.py", "the e command executes"),
    ("sed 's/x/curl y/e' src/app.py", "s///e flag"),
    ("sed 's/a/b/w /tmp/x' src/app.py", "s///w flag"),
    ("sed '1r /etc/passwd' src/app.py", "reads or writes a file"),
    ("sed -f script.sed src/app.py", "sed -f"),
    ("sed -i 's/a/b/' .github/workflows/ci.yml", "CI configuration"),
    ("sed -i'../../*' 's/a/b/' src/app.py", "backup suffix"),
    ("awk 'BEGIN{system(\"curl x\")}'", "system() runs a command"),
    ("awk '{print | \"sh\"}' src/app.py", "pipes"),
    ("awk '{print > \"/tmp/x\"}' src/app.py", "redirects output"),
    ("awk -f prog.awk src/app.py", "awk -f: option not allowed"),
    # git
    ("git push", "git push: always denied"),
    ("git push origin HEAD", "git push: always denied"),
    ("git remote -v", "git remote: always denied"),
    ("git config user.name x", "git config: always denied"),
    ("git credential fill", "git credential: always denied"),
    ("git -c core.sshCommand=x status", "git -c"),
    ("git -c core.fsmonitor=x status", "git -c"),
    ("git --exec-path=/tmp status", "--exec-path"),
    ("git --git-dir=/x/.git log", "option not allowed"),
    ("git -C /etc log", "outside the worktree"),
    ("git commit -m x", "git commit: not allowed"),
    ("git add .", "git add: not allowed"),
    ("git checkout -b x", "git checkout: not allowed"),
    ("git reset --hard", "git reset: not allowed"),
    ("git fetch", "git fetch: not allowed"),
    ("git branch new-branch", "creating branches"),
    ("git branch -D main", "only listing branches"),
    ("git stash", "git stash: only"),
    ("git grep -O curl foo", "git grep -O"),
    ("git diff --no-index /etc/passwd src/app.py", "outside the worktree"),
    # variables that change what runs, and arithmetic that evaluates code
    ("PATH=/tmp:$PATH ls", "setting PATH"),
    ("export PATH=/tmp", "setting PATH"),
    ("LD_PRELOAD=/tmp/x.so ls", "setting LD_PRELOAD"),
    ("BASH_ENV=/tmp/x bash -c ls", "setting BASH_ENV"),
    ("GIT_SSH_COMMAND=x git status", "setting GIT_SSH_COMMAND"),
    ("env GIT_EXTERNAL_DIFF=x git diff", "setting GIT_EXTERNAL_DIFF"),
    ("CDPATH=/ cd etc", "setting CDPATH"),
    ("for PATH in /tmp; do ls; done", "setting PATH"),
    ("x='a[$(id)]'; (( x ))", "((...)) with variables"),
    ("echo $(( x + 1 ))", "$((...)) with variables"),
    ("[[ $x -eq 1 ]]", "arithmetic comparison"),
    ("for ((i=0; i<3; i++)); do ls; done", "C-style for loops"),
    ("echo ${a[$i]}", "array index"),
    ("echo ${!name}", "indirect expansion"),
    ("echo ${x@P}", "the @ operator"),
    ("printf -v 'a[$(id)]' x", "printf -v"),
    ("test -v 'a[$(id)]'", "test -v"),
    ("[ -v x ]", "test -v"),
    ("unset 'a[$(id)]'", "only plain variable names"),
    ("read 'a[$(id)]'", "only plain variable names"),
    ("declare -i x=1", "declare -i"),
    ("[ $X ]", "unquoted expansion"),
    ('X=-v; Y=\'a[$(id)]\'; test "$X" "$Y"', "could read an operator"),
    ('printf "$fmt" x', "non-literal format"),
    ("let x=1", "let: not on the command allowlist"),
    # cd
    ("cd /etc && cat passwd", "cd: /etc"),
    ("cd && ls", "cd without a directory"),
    ("cd - && ls", "cd -"),
    ("cd $DIR", "not a literal"),
    ("cd etc_link", "outside the worktree"),
    ("cd .github && echo x > workflows/ci.yml", "CI configuration"),
    ("cd src && cd .. && cd .. && ls", "outside the worktree"),
    ("command cd /etc", "cd through command"),
    # syntax the policy does not accept
    ('echo "', "could not parse"),
    ("ls (", "could not parse"),
    ("if true; then ls", "could not parse"),
    ("echo $(", "could not parse"),
    ("ls\r", "control characters"),
    ("select x in a b; do echo $x; done", "select"),
    ("coproc curl x", "coproc: not on the command allowlist"),
    ("alias ls=curl", "alias: not on the command allowlist"),
    ("trap 'curl x' EXIT", "trap: not on the command allowlist"),
    ("shopt -s expand_aliases", "shopt: not on the command allowlist"),
    ("builtin cd /", "builtin: not on the command allowlist"),
    # option parsing: the values of options, attached or in the next word, and operands after `--`
    ("grep --file=/etc/passwd src", "grep --file: /etc/passwd"),
    ("grep -rf/etc/passwd src", "grep -f: /etc/passwd"),
    ("grep --include=../x foo src", "outside the worktree"),
    ("grep -- -e /etc", "grep: /etc"),
    ("sort --output /tmp/x src/app.py", "sort --output: /tmp/x"),
    ("sort -T/tmp src/app.py", "sort -T: /tmp"),
    ("sed -n -- '1e curl x' src/app.py", "the e command executes"),
    ("sed --expression='1e x' src/app.py", "the e command executes"),
    ("sed --in-place=../x 's/a/b/' src/app.py", "sed --in-place with a backup suffix"),
    ("sed -nx src/app.py", "sed -x: option not allowed"),
    ("sed --file=x.sed src/app.py", "sed --file: option not allowed"),
    ("awk -vx=1 -f prog.awk src/app.py", "awk -f: option not allowed"),
    ("xargs -a /etc/passwd echo", "xargs -a: /etc/passwd"),
    ("xargs -I $x echo", "xargs -I without a literal replace string"),
    ("timeout --bogus 5 ls", "timeout --bogus: option not allowed"),
    ("tree -ao /tmp/x src", "tree -o: /tmp/x"),
    # long options abbreviated as GNU getopt_long allows: resolved, or denied when unknown or ambiguous
    ("sort --outp=.git/hooks/pre-commit src/app.py", "sort --output: .git/hooks/pre-commit is inside .git"),
    ("sort --out /tmp/x src/app.py", "sort --output: /tmp/x"),
    ("sort --compress-prog=sh -S 1 src/app.py", "sort --compress-program runs a command"),
    ("sort --comp=curl src/app.py", "sort --compress-program runs a command"),
    ("sort --temp=/tmp src/app.py", "sort --temporary-directory: /tmp"),
    ("sort --fil=list.txt", "sort --files0-from reads the files to sort from a list"),
    ("sort --random-sou=/etc/passwd src/app.py", "sort --random-source: /etc/passwd"),
    ("sort --rand=x src/app.py", "sort --rand: unknown or ambiguous option"),
    ("sort --bogus src/app.py", "sort --bogus: unknown or ambiguous option"),
    ("sed --in-pl 's/a/b/' .git/hooks/pre-commit", "sed -i: .git/hooks/pre-commit is inside .git"),
    ("sed --in-pl=../x 's/a/b/' src/app.py", "sed --in-place with a backup suffix"),
    ("sed --expr='1e curl x' src/app.py", "the e command executes"),
    ("sed --fi=x.sed src/app.py", "sed --file: option not allowed"),
    ("sed --bogus src/app.py", "sed --bogus: unknown or ambiguous option"),
    ("grep --exclude-f=/etc/passwd foo src", "grep --exclude-from: /etc/passwd"),
    ("grep --exclude-from /etc/passwd foo src", "grep --exclude-from: /etc/passwd"),
    ("grep --fil=/etc/passwd src", "grep --fil: unknown or ambiguous option"),
    ("rg --pre=curl foo", "rg --pre runs a command"),
    ("rg --hostname-bin curl foo", "rg --hostname-bin runs a command"),
    ("rg --pre-glob '*.gz' --pre curl foo", "rg --pre-glob runs a command"),
    ("rg --pr curl foo", "rg --pr: unknown or ambiguous option"),  # ripgrep takes no abbreviations
    ("rg --pre-g '*.gz' foo", "rg --pre-g: unknown or ambiguous option"),
    ("rg --hostname-b=curl foo", "rg --hostname-b: unknown or ambiguous option"),
    ("rg --ignore-file /etc/passwd foo src", "rg --ignore-file: /etc/passwd"),
    ("rg --files /etc", "rg: /etc"),
    ("git grep --open=curl foo", "git grep -O runs a pager command"),
    ("git grep --op foo", "git grep -O runs a pager command"),
    ("git grep -iOcurl foo", "git grep -O runs a pager command"),
    ("echo http://x | xargs --eof curl echo", "curl: network"),  # --eof takes only =value
    ("echo http://x | xargs --max-lines curl echo", "curl: network"),
    ("xargs --arg=/etc/passwd echo", "xargs -a: /etc/passwd"),
    ("env --chd=/ cat etc/passwd", "env --chd=/: option not allowed"),
    ("env --split='curl x'", "env --split=curl x: option not allowed"),
    ("env A=1 -i curl x", "-i: not on the command allowlist"),  # options end at the first operand
    ("timeout --bogus=1 5 ls", "timeout --bogus=1: option not allowed"),
    ("POSIXLY_CORRECT=1 grep x src -e /etc/passwd", "setting POSIXLY_CORRECT"),
    ("RIPGREP_CONFIG_PATH=rg.conf rg foo", "setting RIPGREP_CONFIG_PATH"),
    # find's single-dash options that write or read lists
    ("find . -fprint .git/hooks/pre-commit", "find -fprint: .git/hooks/pre-commit is inside .git"),
    ("find . -fprint0 /tmp/x", "find -fprint0: /tmp/x"),
    ("find . -fls .github/workflows/x.yml", "find -fls: .github/workflows/x.yml is CI configuration"),
    ("find . -fprintf /tmp/x '%p'", "find -fprintf: /tmp/x"),
    ("find -files0-from list.txt -delete", "find -files0-from reads its start paths"),
    # tree: `--` ends its options; a valued letter takes the next word while its cluster goes on
    ("tree -- -L /etc", "tree: /etc"),
    ("tree -- /etc", "tree: /etc"),
    ("tree -Lo 2 .git/hooks/pre-commit", "tree -o: .git/hooks/pre-commit is inside .git"),
    ("tree -ox .git/hooks/pre-commit", "tree -o: .git/hooks/pre-commit is inside .git"),
    ("tree -L2o /tmp/x src", "tree -o: /tmp/x"),
    ("tree -L2 /etc", "tree: /etc"),
    ("tree --output=x src", "tree --output: unknown or ambiguous option"),
    ("tree --outfile x src", "tree --outfile: unknown or ambiguous option"),
    ("tree -RL 1 -H . src", "tree -R writes a 00Tree.html"),
    ("tree --fromfile /etc/passwd", "tree: /etc/passwd"),
    ("tree --infofile=/etc/passwd src", "tree --infofile: /etc/passwd"),
    ("tree --gitfile /etc/passwd src", "tree --gitfile: /etc/passwd"),
    ("tree -H . --hintro=../outside.txt src", "tree --hintro: ../outside.txt resolves"),
    # jq: -f and -L found in clusters and after --args, file options checked, the filter found
    ("jq -nf /etc/passwd", "jq -f: filters from files"),
    ("jq -rf filter.jq package.json", "jq -f: filters from files"),
    ("jq --from-file filter.jq package.json", "jq --from-file: filters from files"),
    ("jq -nL /tmp .", "jq -L: filters from files and module paths"),
    ("jq --args -nf filter.jq", "jq -f: filters from files"),
    ("jq -n --args 'import \"x\" as $x; .'", "jq import"),
    ("jq --arg x y 'include \"x\"; .' package.json", "jq import"),
    ("jq --slurpfile x /etc/passwd -n '$x'", "jq --slurpfile: /etc/passwd"),
    ("jq --argfile x ../outside.txt -n '$x'", "jq --argfile: ../outside.txt resolves"),
    ("jq --indent 2 . /etc/passwd", "jq: /etc/passwd"),
    ("jq --bogus . package.json", "jq --bogus: unknown or ambiguous option"),
    # expansions where a command reads options: the shell could hand it -exec, --output=..., --pre=...
    ("x=-exec; find . -name a $x curl {} \\;", "find $…: an expansion where find reads its expression"),
    ('find . -type f "$x" /tmp/out', "find $…: an expansion where find reads its expression"),
    ('git diff "$x"', "git diff $…: an expansion here could be an option"),
    ('git diff --output="$x"', "git diff --output=$…: an expansion here could be an option"),
    ('git grep "$x" foo', "git grep $…: an expansion here could be an option"),
    ('rg "$x" src', "rg $…: an expansion here could be an option"),
    ("grep --file=$x src", "grep --file=$…: an expansion here could be an option"),
    ("grep foo$x src", "grep foo$…: an expansion here could be an option"),  # unquoted: it may split
    # unquoted expansions taken as option values: splitting could add options or a command
    ("grep -e $x src", "grep $…: an unquoted expansion could split into more arguments"),
    ("env -u $x ls", "env $…: an unquoted expansion could split"),
    ("awk -v $x '{print}' src/app.py", "awk $…: an unquoted expansion could split"),
    ("npx -p $x eslint .", "npx $…: an unquoted expansion could split"),
    ("read -d $x line", "read $…: an unquoted expansion could split"),
    ("find . -name $x", "find $…: an expansion where find reads its expression"),
    ("find . -exec echo $x \\;", "find -exec $…: an unquoted expansion could split"),
    # shell options that change how bash reads what follows
    ("set -k; ls PATH=/tmp/bin", "set -k: not allowed"),
    ("set -o keyword; ls PATH=/tmp/bin", "set -o keyword: not allowed"),
    ("set -eo history", "set -o history: not allowed"),
    ("set -H", "set -H: not allowed"),
    ("bash -o keyword -c 'ls PATH=/tmp/bin'", "bash -o keyword: not allowed"),
    ("bash -o $x -c ls", "bash with a non-literal argument"),
    # file values of read commands' options, attached or abbreviated
    ("date -f/etc/passwd", "date -f: /etc/passwd"),
    ("date -uf/etc/passwd", "date -f: /etc/passwd"),
    ("date --fil=etc_link/passwd", "date --fil: etc_link/passwd resolves to /etc/passwd"),
    ("file -m/etc/magic src/app.py", "file -m: /etc/magic"),
    ("du -X/etc/x .", "du -X: /etc/x"),
    # patterns read as bash reads them: [^x] negates, and POSIX classes are not expanded by the policy
    ("cat [^x]tc_link/passwd", "etc_link/passwd resolves to /etc/passwd, outside the worktree"),
    ("cat [[:alpha:]]tc_link/passwd", "has a bracket class ([[:alpha:]])"),
    # code points tree-sitter-bash crashes on, and text that cannot be encoded
    ("echo {\U000e0100", "characters beyond U+2FFFF"),
    ("echo {\U000f0000}", "characters beyond U+2FFFF"),
    ("echo \udc80", "lone surrogates"),
    # sed scripts the checker once raised on
    ("sed ls", "the sed script could not be parsed"),
    ("sed y", "the sed script could not be parsed"),
    ("sed s src/app.py", "the sed script could not be parsed"),
    ("sed -n 'y/abc/' src/app.py", "the sed script could not be parsed"),
    ("sed '\\' src/app.py", "the sed script could not be parsed"),
    ("sed -n '/a\\' src/app.py", "the sed script could not be parsed"),
]


@pytest.mark.parametrize(("command", "rule"), DENIED)
def test_denied_commands_name_the_rule(policy: AgentPolicy, command: str, rule: str) -> None:
    decision = policy.check_bash(command)
    assert not decision.allowed, command
    assert rule in decision.reason, decision.reason
    assert decision.reason.startswith("Bash command denied: ")


def test_enough_policy_cases_and_a_sane_default_allowlist() -> None:
    assert len(ALLOWED) + len(DENIED) + len(TOOL_CASES) >= 150
    assert {"ls", "git", "npm", "python3", "pytest", "make", "cargo", "go"} <= DEFAULT_ALLOWED_COMMANDS
    assert not DEFAULT_ALLOWED_COMMANDS & ALWAYS_DENIED_COMMANDS


# Random command lines: checked commands with pieces of their options and programs, and shell syntax.
_COMMANDS = [
    "ls", "cat", "sed", "sort", "tree", "jq", "grep", "rg", "find", "xargs", "env", "timeout", "git",
    "git grep", "bash -c", "awk", "cd", "echo", "npx", "uv run", "time", "command", "exec", "./run.sh",
]  # fmt: skip
_ARGUMENTS = [
    "-", "--", "-c", "-e", "-f", "-i", "-n", "-o", "-L", "-O", "-R", "-Lo", "-nf", "-ox", "--outp=x",
    "--in-pl", "--eof", "--args", "--arg", "--files", "-exec", "-delete", "{}", "\\;", "+", "grep",
    "s/a/b/", "y", "s", "ls", "1e x", "/a\\", "y/ab/", "'{print}'", ".", "'$x'", "/etc", "src/app.py",
    ".git/hooks/x", "..", "~", "*", "$x", "${x}", "x=1", "'a b'", "\"$(ls)\"",
]  # fmt: skip
_SHELL = ["|", "||", "&&", "&", ";", "\n", ">", ">>", "<", "<<<", "(", ")", "{", "}", "$(", "`", "'", '"',
          "<<EOF\nx\nEOF\n", "[[", "]]", "#", "!", "\\", "$'\\x41'", "<(ls)", "$((1))"]  # fmt: skip
_simple_command = st.builds(
    lambda name, arguments: " ".join([name, *arguments]),
    st.sampled_from(_COMMANDS),
    st.lists(st.sampled_from(_ARGUMENTS) | st.text(max_size=3), max_size=5),
)
_command_lines = st.builds(
    lambda first, more: first + "".join(f" {glue} {command}" for glue, command in more),
    _simple_command,
    st.lists(st.tuples(st.sampled_from(_SHELL), _simple_command), max_size=2),
)
_shell_soup = st.tuples(
    st.lists(st.sampled_from(_COMMANDS + _ARGUMENTS + _SHELL) | st.text(max_size=4), max_size=14),
    st.sampled_from([" ", ""]),
).map(lambda parts: parts[1].join(parts[0]))
_FUZZ = settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@_FUZZ
@given(command=st.one_of(_command_lines, _command_lines, _shell_soup, st.text(max_size=200)))
def test_check_bash_answers_every_input_without_raising(policy: AgentPolicy, command: str) -> None:
    decision = policy.check_bash(command)
    assert isinstance(decision, Decision) and decision.reason
    assert "internal policy error" not in decision.reason, (command, decision.reason)


@_FUZZ
@given(script=st.text(alphabet="sy/|\\aeirwp1$,;{}!# \nIg", max_size=12))
def test_every_sed_script_gets_an_answer(policy: AgentPolicy, script: str) -> None:
    decision = policy.check_bash(f"sed -n {_single_quote(script)} src/app.py")
    assert "internal policy error" not in decision.reason, (script, decision.reason)


def test_check_bash_fails_closed_when_the_policy_itself_breaks(worktree: Path) -> None:
    class Broken(AgentPolicy):
        def parser(self) -> Parser:
            raise RuntimeError("boom")

    decision = Broken(PolicyConfig(worktree=worktree)).check_bash("ls")
    assert not decision.allowed
    assert decision.reason == "Bash command denied: internal policy error: RuntimeError('boom')"


def test_empty_long_and_deep_commands(policy: AgentPolicy) -> None:
    assert not policy.check_bash("").allowed
    assert not policy.check_bash("   \n ").allowed
    long_echo = "echo " + "word " * 15_000
    assert policy.check_bash(long_echo).allowed
    too_long = policy.check_bash("echo " + "a" * 100_001)
    assert not too_long.allowed and "longer than" in too_long.reason
    deep = policy.check_bash("(" * 3000 + "ls" + ")" * 3000)
    assert not deep.allowed
    nested = "ls"
    for _ in range(6):
        nested = f"bash -c {_single_quote(nested)}"
    decision = policy.check_bash(nested)
    assert not decision.allowed and "nested more than" in decision.reason


def _single_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def test_background_flag_is_denied(policy: AgentPolicy) -> None:
    decision = policy.check_bash("npm test", run_in_background=True)
    assert not decision.allowed and "run_in_background" in decision.reason


def test_extra_allowed_commands_extend_the_allowlist(worktree: Path) -> None:
    policy = AgentPolicy(PolicyConfig(worktree=worktree, extra_allowed_commands=frozenset({"terraform"})))
    assert policy.check_bash("terraform plan -out plan.bin").allowed
    assert not policy.check_bash("terraform plan -out /tmp/plan.bin").allowed
    assert not policy.check_bash("curl x").allowed


@pytest.mark.parametrize("name", ["curl", "gh", "sudo", "eval", "bash", "a b", "x/y", ""])
def test_extra_commands_cannot_unlock_denied_names(worktree: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="AGENT_ALLOWED_COMMANDS"):
        AgentPolicy(PolicyConfig(worktree=worktree, extra_allowed_commands=frozenset({name})))


def test_ci_writes_follow_the_setting(worktree: Path) -> None:
    strict = AgentPolicy(PolicyConfig(worktree=worktree))
    lenient = AgentPolicy(PolicyConfig(worktree=worktree, allow_ci_config_writes=True))
    for command in (
        "echo x > .github/workflows/ci.yml",
        "sed -i 's/a/b/' .gitlab-ci.yml",
        "touch Jenkinsfile",
    ):
        assert not strict.check_bash(command).allowed, command
        assert lenient.check_bash(command).allowed, command
    assert not lenient.check_bash("echo x > .git/config").allowed


def test_read_only_sessions_read_and_nothing_else(worktree: Path) -> None:
    policy = AgentPolicy(PolicyConfig(worktree=worktree, read_only=True))
    readers = ["cat src/app.py | grep hi", "git diff HEAD~1", "ls 2>/dev/null", "bash -c 'git log -1'"]
    for command in readers:
        assert policy.check_bash(command).allowed, command
    writers = ["echo x > notes.txt", "rm src/app.py", "sed -i 's/a/b/' src/app.py", "find src -delete"]
    runners = ["npm test", "python3 -c 1", "./run.sh", "bash run.sh", "source run.sh"]
    for command in writers + runners:
        decision = policy.check_bash(command)
        assert not decision.allowed and "read-only" in decision.reason, command
    assert policy.check_tool("Read", {"file_path": "src/app.py"}).allowed
    assert not policy.check_tool(
        "Edit", {"file_path": "src/app.py", "old_string": "", "new_string": ""}
    ).allowed


def test_relative_paths_follow_the_shell_working_directory(policy: AgentPolicy, worktree: Path) -> None:
    assert policy.check_bash("cat app.py", cwd=worktree / "src").allowed
    assert policy.check_bash("cat ../run.sh", cwd=worktree / "src").allowed
    assert not policy.check_bash("cat ../../outside.txt", cwd=worktree / "src").allowed
    assert not policy.check_bash("echo x > workflows/ci.yml", cwd=worktree / ".github").allowed
    outside = policy.check_bash("ls", cwd=worktree.parent)
    assert not outside.allowed and "working directory" in outside.reason


def test_patterns_expand_neither_to_options_nor_out_of_the_worktree(
    policy: AgentPolicy, worktree: Path
) -> None:
    hook = worktree / "--output=.git" / "hooks" / "pre-commit"
    hook.parent.mkdir(parents=True)
    hook.write_text("x\n")
    option = policy.check_bash("sort */*/*")  # bash passes --output=.git/hooks/pre-commit to sort
    assert not option.allowed and "matches --output=.git/hooks/pre-commit, an option to sort" in option.reason
    outside = policy.check_bash("grep /etc/pass* src")  # the pattern operand becomes /etc/passwd, a file
    assert not outside.allowed and "outside the worktree" in outside.reason
    assert not policy.check_bash("echo etc_*").allowed  # etc_link resolves to /etc
    assert policy.check_bash("wc -l src/*.py && echo src/*").allowed


def test_project_scripts_run_only_from_inside_the_worktree(policy: AgentPolicy, worktree: Path) -> None:
    (worktree / ".venv" / "bin").mkdir(parents=True)
    (worktree / ".venv" / "bin" / "python").symlink_to("/usr/bin/python3")
    (worktree / "curl").write_text("#!/bin/sh\n")
    assert policy.check_bash("./run.sh --flag").allowed
    assert policy.check_bash(f"{worktree}/run.sh").allowed
    assert policy.check_bash(".venv/bin/python -m pytest").allowed
    assert not policy.check_bash("./curl").allowed  # the name is still a network tool
    assert not policy.check_bash("../outside.txt").allowed
    assert not policy.check_bash("etc_link/passwd").allowed


# --- file tools -------------------------------------------------------------------------------------

TOOL_CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("Read", {"file_path": "src/app.py"}, True),
    ("Read", {"file_path": "src/missing/deeper.py"}, True),
    ("Read", {"file_path": "/etc/passwd"}, False),
    ("Read", {"file_path": "../outside.txt"}, False),
    ("Read", {"file_path": "src/../../outside.txt"}, False),
    ("Read", {"file_path": "etc_link/passwd"}, False),
    ("Read", {"file_path": "~/.ssh/id_rsa"}, False),
    ("Read", {"file_path": "/proc/self/environ"}, False),
    ("Read", {"file_path": ""}, False),
    ("Read", {"file_path": 42}, False),
    ("Write", {"file_path": "src/new/nested/module.py", "content": "x"}, True),
    ("Write", {"file_path": "README.md", "content": "x"}, True),
    ("Write", {"file_path": "/tmp/x.py", "content": "x"}, False),
    ("Write", {"file_path": "etc_link/cron.d/x", "content": "x"}, False),
    ("Write", {"file_path": "etc_link/new-dir/x", "content": "x"}, False),
    ("Write", {"file_path": ".github/workflows/ci.yml", "content": "x"}, False),
    ("Write", {"file_path": ".github/workflows/new.yml", "content": "x"}, False),
    ("Edit", {"file_path": ".GitHub/Workflows/ci.yml", "old_string": "a", "new_string": "b"}, False),
    ("Write", {"file_path": ".github/actions/setup/action.yml", "content": "x"}, False),
    ("Write", {"file_path": ".gitlab-ci.yml", "content": "x"}, False),
    ("Write", {"file_path": ".circleci/config.yml", "content": "x"}, False),
    ("Write", {"file_path": "Jenkinsfile", "content": "x"}, False),
    ("Write", {"file_path": "azure-pipelines.yml", "content": "x"}, False),
    ("Write", {"file_path": ".buildkite/pipeline.yml", "content": "x"}, False),
    ("Write", {"file_path": "bitbucket-pipelines.yml", "content": "x"}, False),
    ("Write", {"file_path": ".travis.yml", "content": "x"}, False),
    ("Write", {"file_path": ".drone.yml", "content": "x"}, False),
    ("Write", {"file_path": ".github/CODEOWNERS", "content": "x"}, True),
    ("MultiEdit", {"file_path": ".git/hooks/pre-commit", "edits": []}, False),
    ("Edit", {"file_path": "sub/.git/config", "old_string": "a", "new_string": "b"}, False),
    ("Write", {"content": "no path"}, False),
    ("Glob", {"pattern": "**/*.py"}, True),
    ("Glob", {"pattern": "*.py", "path": "src"}, True),
    ("Glob", {"pattern": "/etc/*"}, False),
    ("Glob", {"pattern": "../*"}, False),
    ("Glob", {"pattern": "*/../../outside.txt"}, False),
    ("Glob", {"pattern": "*.py", "path": "/etc"}, False),
    ("Grep", {"pattern": "password", "path": "src"}, True),
    ("Grep", {"pattern": "password"}, True),
    ("Grep", {"pattern": "password", "path": "/etc"}, False),
    ("LS", {"path": "."}, True),
    ("LS", {"path": "etc_link"}, False),
    ("TodoWrite", {"todos": []}, True),
    ("TaskCreate", {"subject": "x"}, True),
    ("WebFetch", {"url": "http://example.com", "prompt": "x"}, False),
    ("WebSearch", {"query": "x"}, False),
    ("NotebookEdit", {"notebook_path": "a.ipynb", "new_source": "x"}, False),
    ("Task", {"prompt": "x", "description": "x"}, False),
    ("Agent", {"prompt": "x", "description": "x"}, False),
    ("mcp__github__create_pull_request", {}, False),
    ("SomethingNew", {}, False),
    ("Bash", {"command": "ls"}, True),
    ("Bash", {"command": "curl x"}, False),
    ("Bash", {"command": "npm start", "run_in_background": True}, False),
    ("Bash", {"command": "ls", "dangerouslyDisableSandbox": True}, False),
    ("Bash", {"command": ["ls"]}, False),
    ("Bash", {}, False),
]


@pytest.mark.parametrize(("tool", "tool_input", "allowed"), TOOL_CASES)
def test_tool_cases(policy: AgentPolicy, tool: str, tool_input: dict[str, Any], allowed: bool) -> None:
    decision = policy.check_tool(tool, tool_input)
    assert decision.allowed is allowed, decision.reason
    assert decision.reason


def test_file_tool_absolute_paths_inside_and_denial_reasons(policy: AgentPolicy, worktree: Path) -> None:
    assert policy.check_tool("Read", {"file_path": str(worktree / "src" / "app.py")}).allowed
    assert policy.check_tool("Write", {"file_path": str(worktree / "src" / "z.py"), "content": ""}).allowed
    outside = policy.check_tool("Read", {"file_path": "etc_link/passwd"})
    assert "etc_link/passwd" in outside.reason and "outside the worktree" in outside.reason
    ci = policy.check_tool("Write", {"file_path": ".github/workflows/ci.yml", "content": ""})
    assert "CI configuration" in ci.reason and "ALLOW_CI_CONFIG_WRITES" in ci.reason
    assert "denied to the agent by default" in policy.check_tool("WebFetch", {}).reason
    assert "unknown tools are denied" in policy.check_tool("mcp__x__y", {}).reason


def test_ci_file_writes_allowed_by_the_setting(worktree: Path) -> None:
    policy = AgentPolicy(PolicyConfig(worktree=worktree, allow_ci_config_writes=True))
    assert policy.check_tool("Write", {"file_path": ".github/workflows/ci.yml", "content": ""}).allowed
    assert policy.check_tool("Edit", {"file_path": "Jenkinsfile", "old_string": "", "new_string": ""}).allowed
    assert not policy.check_tool("Write", {"file_path": ".git/config", "content": ""}).allowed
    assert not policy.check_tool("Write", {"file_path": "/tmp/x", "content": ""}).allowed


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (".github/workflows/ci.yml", True),
        (".GITHUB/workflows/CI.YML", True),
        ("./.github/actions/a/action.yml", True),
        ("Jenkinsfile", True),
        ("ci/Jenkinsfile", True),
        (".gitlab-ci.yml", True),
        (".github/dependabot.yml", False),
        ("src/workflows/x.yml", False),
        ("docs/travis.yml", False),
    ],
)
def test_is_ci_config_path(path: str, expected: bool) -> None:
    assert is_ci_config_path(path) is expected


# --- the hook ---------------------------------------------------------------------------------------


def _pre_tool_use(tool: str, tool_input: dict[str, Any], cwd: Path) -> dict[str, Any]:
    return {
        "session_id": "session-1",
        "transcript_path": str(cwd / "transcript.jsonl"),
        "cwd": str(cwd),
        "permission_mode": "acceptEdits",
        "hook_event_name": "PreToolUse",
        "tool_name": tool,
        "tool_input": tool_input,
        "tool_use_id": "toolu_1",
    }


def _call(hook: Any, input_data: Mapping[str, Any]) -> Any:
    return asyncio.run(hook(input_data, "toolu_1", {"signal": None}))


def test_hook_output_has_the_shape_the_sdk_documents(policy: AgentPolicy, worktree: Path) -> None:
    denials: list[tuple[str, dict[str, Any], str]] = []
    hook = pre_tool_use_hook(policy, lambda tool, inp, reason: denials.append((tool, dict(inp), reason)))

    denied = _call(hook, _pre_tool_use("Bash", {"command": "curl http://x"}, worktree))
    allowed = _call(hook, _pre_tool_use("Bash", {"command": "python3 -c 'print(1)'"}, worktree))

    documented = typing.get_type_hints(PreToolUseHookSpecificOutput)
    decisions = typing.get_args(documented["permissionDecision"])
    for output, decision in ((denied, "deny"), (allowed, "allow")):
        assert set(output) == {"hookSpecificOutput"}
        specific = output["hookSpecificOutput"]
        assert set(specific) <= set(documented)
        assert specific["hookEventName"] == "PreToolUse"
        assert specific["permissionDecision"] == decision and decision in decisions
        assert isinstance(specific["permissionDecisionReason"], str)
    assert "curl" in denied["hookSpecificOutput"]["permissionDecisionReason"]
    assert denials == [
        ("Bash", {"command": "curl http://x"}, denied["hookSpecificOutput"]["permissionDecisionReason"])
    ]


def test_hook_uses_the_session_cwd_and_ignores_other_events(policy: AgentPolicy, worktree: Path) -> None:
    hook = pre_tool_use_hook(policy, lambda *_: None)
    in_src = _call(hook, _pre_tool_use("Read", {"file_path": "app.py"}, worktree / "src"))
    assert in_src["hookSpecificOutput"]["permissionDecision"] == "allow"
    outside = _call(hook, _pre_tool_use("Read", {"file_path": "x"}, worktree.parent))
    assert outside["hookSpecificOutput"]["permissionDecision"] == "deny"
    post = {**_pre_tool_use("Bash", {"command": "curl x"}, worktree), "hook_event_name": "PostToolUse"}
    assert _call(hook, post) == {}


def test_hook_fails_closed(worktree: Path) -> None:
    class Broken(AgentPolicy):
        def check_tool(
            self, tool_name: str, tool_input: Mapping[str, Any], *, cwd: Path | None = None
        ) -> Decision:
            raise RuntimeError("boom")

    def failing_recorder(tool: str, tool_input: Mapping[str, Any], reason: str) -> None:
        raise RuntimeError("recorder down")

    hook = pre_tool_use_hook(Broken(PolicyConfig(worktree=worktree)), failing_recorder)
    output = _call(hook, _pre_tool_use("Read", {"file_path": "src/app.py"}, worktree))
    assert output["hookSpecificOutput"]["permissionDecision"] == "deny"
    assert "policy check failed" in output["hookSpecificOutput"]["permissionDecisionReason"]


def test_hook_matchers_cover_every_tool_and_block_on_failure(policy: AgentPolicy) -> None:
    matchers = hook_matchers(policy, lambda *_: None)
    assert list(matchers) == ["PreToolUse"]
    (matcher,) = matchers["PreToolUse"]
    assert isinstance(matcher, HookMatcher)
    assert matcher.matcher is None and matcher.on_failure == "block" and len(matcher.hooks) == 1
    assert ClaudeAgentOptions(hooks=matchers).hooks == matchers


@pytest.mark.e2e
def test_hook_through_the_real_cli(tmp_path: Path) -> None:
    """The CLI asks the hook: curl and CI writes are refused, python (normally 'requires approval') runs."""
    repo = tmp_path / "repo"
    (repo / ".github" / "workflows").mkdir(parents=True)
    script = Script(
        "Do the work",
        [
            Turn(
                tool_calls=[
                    ToolCall.bash("curl -s http://127.0.0.1:9/"),
                    ToolCall.bash("python3 -c 'print(6 * 7)'"),
                    ToolCall.write(".github/workflows/evil.yml", "on: push\n"),
                ]
            ),
            Turn(tool_calls=[ToolCall.bash("cd .github")]),  # the shell's cwd persists between calls
            Turn(tool_calls=[ToolCall.bash("echo x > workflows/evil.yml")]),
        ],
    )
    policy = AgentPolicy(PolicyConfig(worktree=repo.resolve()))
    denials: list[tuple[str, str]] = []

    async def run(options: ClaudeAgentOptions) -> list[Any]:
        messages: list[Any] = []
        try:
            async for message in query(prompt="Do the work now", options=options):
                messages.append(message)
        except ClaudeSDKError:
            pass
        return messages

    with ScriptedModelServer([script]) as server:
        options = ClaudeAgentOptions(
            cwd=str(repo),
            model="claude-sonnet-4-5",
            permission_mode="acceptEdits",
            env=agent_env(server.base_url, tmp_path / "home"),
            hooks=hook_matchers(policy, lambda tool, _input, reason: denials.append((tool, reason))),
        )
        messages = asyncio.run(run(options))
        bash = {r.tool_use_id: r for r in server.tool_results("Bash")}
        writes = server.tool_results("Write")
    curl, python = bash["toolu_s0_m0_t0_c0"], bash["toolu_s0_m0_t0_c1"]
    assert curl.is_error and "curl: network" in curl.content
    assert not python.is_error and "42" in python.content
    assert len(writes) == 1 and writes[0].is_error and "CI configuration" in writes[0].content
    assert not bash["toolu_s0_m0_t1_c0"].is_error
    relative = bash["toolu_s0_m0_t2_c0"]
    assert relative.is_error and "workflows/evil.yml is CI configuration" in relative.content
    assert not (repo / ".github" / "workflows" / "evil.yml").exists()
    assert [tool for tool, _ in denials] == ["Bash", "Write", "Bash"]
    results = [m for m in messages if isinstance(m, ResultMessage)]
    assert len(results) == 1
    denied_ids = {d["tool_use_id"] for d in results[0].permission_denials or []}
    assert "toolu_s0_m0_t0_c0" in denied_ids


# --- the environment --------------------------------------------------------------------------------


def test_agent_environment_is_built_from_nothing(tmp_path: Path) -> None:
    source = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/home/service",
        "SSL_CERT_FILE": "/certs/ca.pem",
        "GH_TOKEN": "ghp_secret",
        "GITHUB_TOKEN": "ghs_secret",
        "GH_ENTERPRISE_TOKEN": "ghe_secret",
        "WEBHOOK_SECRET": "hook",
        "API_TOKEN": "api",
        "DATABASE_URL": "postgresql://u:p@h/db",
        "JIRA_EMAIL": "a@b.c",
        "LANGFUSE_PUBLIC_KEY": "pk",
        "MY_DB_PASSWORD": "pw",
        "SOME_SECRET_VALUE": "s",
        "NPM_TOKEN": "npm",
        "ANTHROPIC_API_KEY": "from-the-service-env",
        "UNLISTED": "not passed",
    }
    env = agent_environment(
        home=tmp_path / "home",
        config_dir=tmp_path / "home" / ".claude",
        anthropic={"ANTHROPIC_API_KEY": "sk-agent", "ANTHROPIC_AUTH_TOKEN": "tok", "API_TIMEOUT_MS": "1000"},
        passthrough=[name for name in source if name != "UNLISTED"],
        source=source,
    )
    assert env == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": str(tmp_path / "home"),
        "CLAUDE_CONFIG_DIR": str(tmp_path / "home" / ".claude"),
        "SSL_CERT_FILE": "/certs/ca.pem",
        "ANTHROPIC_API_KEY": "sk-agent",
        "ANTHROPIC_AUTH_TOKEN": "tok",
        "API_TIMEOUT_MS": "1000",
    }


def test_agent_environment_defaults_and_refusals(tmp_path: Path) -> None:
    env = agent_environment(home=tmp_path, config_dir=tmp_path / "c", anthropic={}, passthrough=[], source={})
    assert set(env) == {"PATH", "HOME", "CLAUDE_CONFIG_DIR"} and env["PATH"]
    with pytest.raises(ValueError, match="GH_TOKEN"):
        agent_environment(
            home=tmp_path, config_dir=tmp_path, anthropic={"GH_TOKEN": "x"}, passthrough=[], source={}
        )


@pytest.mark.parametrize(
    ("name", "denied"),
    [
        ("GH_TOKEN", True),
        ("gh_token", True),
        ("GITHUB_TOKEN", True),
        ("JIRA_API_TOKEN", True),
        ("LANGFUSE_SECRET_KEY", True),
        ("DATABASE_URL", True),
        ("PGPASSWORD", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("PATH", False),
        ("SSL_CERT_FILE", False),
        ("GH_HOST", False),
        ("NODE_ENV", False),
    ],
)
def test_denied_env_names(name: str, denied: bool) -> None:
    assert is_denied_env_name(name) is denied
