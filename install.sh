#!/bin/sh
# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The isstreamer_lite authors
#
# Install isstreamer_lite.py (the file next to this script) for one Python,
# precompile it, then run its offline smoke test. POSIX sh; `sh install.sh
# --help` for usage.
#
# Exit status: 0 ok, 1 install or smoke test failed, 2 usage error (including
# a Python older than 3.6, and a user-site install for a Python that does not
# read its user site-packages, such as one in a virtual environment).

MODULE=isstreamer_lite
PROG=install.sh

usage() {
    cat <<EOF
Usage: sh $PROG [--user | --system | --target DIR] [--python PATH] [--uninstall]

Install $MODULE.py, found next to this script, for one Python interpreter,
precompile it into __pycache__ beside it (so a read-only system or
PYTHONDONTWRITEBYTECODE=1 still imports it fast), then run its offline smoke
test (python -m $MODULE) with that interpreter. Works from a checkout or from
install.sh and $MODULE.py copied side by side.

Where to install (pick one; the same options select what --uninstall removes):
  --user          the interpreter's user site-packages (python -m site
                  --user-site), created 0755 if missing; no root needed.
                  This is the default. Refused (exit 2) for a Python that
                  does not read that folder, such as one in a virtual
                  environment: the message says what to run instead.
  --system        the interpreter's site-packages (sysconfig purelib);
                  usually needs root.
  --target DIR    the folder DIR, created if missing: a project's vendor
                  folder, a mounted SD card. Python imports the module from
                  there only with DIR on PYTHONPATH or sys.path.

Options:
  --python PATH   the interpreter to install for (default: python3). It must
                  be Python 3.6 or newer.
  --uninstall     remove $MODULE.py (and its cached bytecode) from the
                  selected location instead of installing it.
  -h, --help      show this help and exit.

The copy is atomic (a temporary file in the destination, then a rename) and
checked byte for byte; running the script again is harmless. It says what it
did: "Installed X", "Upgraded X -> Y" (or "Downgraded"), "Reinstalled X"
(same version, different file) or "already installed" (identical file).

Examples:
  sh $PROG                              # python3's user site-packages
  sudo sh $PROG --system                # python3's site-packages, for all users
  sh $PROG --python /usr/bin/python3.9  # another interpreter's user site
  sh $PROG --python venv/bin/python --system    # into a virtual environment
  sh $PROG --target ./vendor            # vendor it into a project
  sh $PROG --target /media/pi/SDCARD    # onto a mounted card
  sh $PROG --uninstall                  # remove the user-site copy
  sh $PROG --uninstall --target ./vendor        # remove the vendored copy

Then, in Python:
  from $MODULE import Streamer

Exit status: 0 ok, 1 install or smoke test failed, 2 usage error (unknown
option, missing argument, Python older than 3.6, a user-site install for a
Python that does not read its user site-packages).
EOF
}

say() {
    printf '%s\n' "$*"
}

warn() {
    printf '%s: warning: %s\n' "$PROG" "$*" >&2
}

fail() {
    # fail STATUS MESSAGE: print MESSAGE to stderr and exit with STATUS.
    status=$1
    shift
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit "$status"
}

usage_error() {
    printf '%s: %s\n' "$PROG" "$*" >&2
    printf "Try 'sh %s --help' for more information.\n" "$PROG" >&2
    exit 2
}

# --- Options ------------------------------------------------------------------

mode=user
mode_option=
python=python3
uninstall=no
target=

set_mode() {
    # set_mode MODE OPTION: choose the location once; a second choice is an error.
    if [ -n "$mode_option" ] && [ "$mode_option" != "$2" ]; then
        usage_error "$mode_option and $2 cannot be used together"
    fi
    mode=$1
    mode_option=$2
}

while [ "$#" -gt 0 ]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --user)
            set_mode user --user
            ;;
        --system)
            set_mode system --system
            ;;
        --target | --python)
            if [ "$#" -lt 2 ] || [ -z "$2" ]; then
                usage_error "option $1 needs an argument"
            fi
            if [ "$1" = --target ]; then
                set_mode target --target
                target=$2
            else
                python=$2
            fi
            shift
            ;;
        --target=*)
            set_mode target --target
            target=${1#--target=}
            [ -n "$target" ] || usage_error "option --target needs an argument"
            ;;
        --python=*)
            python=${1#--python=}
            [ -n "$python" ] || usage_error "option --python needs an argument"
            ;;
        --uninstall)
            uninstall=yes
            ;;
        *)
            usage_error "unknown option: $1"
            ;;
    esac
    shift
done

# --- The module next to this script -----------------------------------------

script_dir=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P) ||
    fail 1 "cannot find the folder of $0"
source_file=$script_dir/$MODULE.py
if [ "$uninstall" = no ] && [ ! -f "$source_file" ]; then
    fail 1 "$MODULE.py is not next to this script (looked for $source_file);" \
        "copy install.sh and $MODULE.py into the same folder"
fi
version=
if [ -f "$source_file" ]; then
    version=$(sed -n 's/^__version__ = "\([^"]*\)".*$/\1/p' "$source_file" | head -n 1)
    if [ "$uninstall" = no ] && [ -z "$version" ]; then
        fail 1 "$source_file has no __version__ line: is it really $MODULE.py?"
    fi
fi

# --- The interpreter ----------------------------------------------------------

case $python in
    /*) ;;
    */*) python=$(pwd -P)/$python ;;  # the smoke test runs in another folder
    *) ;;
esac
if ! command -v "$python" >/dev/null 2>&1; then
    usage_error "no Python interpreter at '$python' (see --python)"
fi
# This line must run on Python 2 as well, to refuse it with a clear message.
python_version=$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) ||
    usage_error "'$python' did not run as a Python interpreter (see --python)"
case $python_version in
    [0-2].* | 3.[0-5].*)
        printf '%s: error: %s is Python %s; %s needs Python 3.6 or newer.\n' \
            "$PROG" "$python" "$python_version" "$MODULE" >&2
        printf 'Choose another interpreter with --python PATH.\n' >&2
        exit 2
        ;;
    *) ;;
esac

# --- The destination ----------------------------------------------------------

site_packages() {
    "$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' ||
        fail 1 "$python did not tell its site-packages folder"
}

refuse_user_site() {
    # The interpreter would not import a copy in its user site: say what works.
    in_venv=$("$python" -c 'import sys
base = getattr(sys, "real_prefix", getattr(sys, "base_prefix", sys.prefix))
print("yes" if sys.prefix != base else "no")') || in_venv=no
    purelib=$(site_packages)
    {
        if [ "$in_venv" = yes ]; then
            say "$PROG: error: $python runs in a virtual environment, which does not"
            say "read the user site-packages ($dest_dir),"
            say "so it could not import $MODULE from there. Nothing was installed."
            say "Install into the environment instead ($purelib;"
            say "no root needed for an environment of your own):"
            say "  sh $0 --python $python --system"
            if [ -f "$script_dir/pyproject.toml" ]; then
                case $python_version in
                    3.6.*) ;;    # pyproject.toml needs setuptools>=61: Python 3.7+
                    *)
                        say "or with the environment's own pip:"
                        say "  $python -m pip install $script_dir"
                        ;;
                esac
            fi
        else
            say "$PROG: error: $python does not read its user site-packages"
            say "($dest_dir): PYTHONNOUSERSITE is set, or the user site"
            say "is disabled, so it could not import $MODULE from there. Nothing was"
            say "installed. Unset PYTHONNOUSERSITE, or install elsewhere:"
            say "  sh $0 --python $python --system      # into $purelib"
            say "  sh $0 --python $python --target DIR  # then DIR on PYTHONPATH"
        fi
    } >&2
    exit 2
}

case $mode in
    user)
        # Exits 0 only if this interpreter reads its user site (not in a
        # virtual environment, no -s or PYTHONNOUSERSITE); prints it anyway.
        user_site_enabled=yes
        dest_dir=$("$python" -m site --user-site) || user_site_enabled=no
        [ -n "$dest_dir" ] || fail 1 "$python did not tell its user site-packages folder"
        if [ "$user_site_enabled" = no ] && [ "$uninstall" = no ]; then
            refuse_user_site
        fi
        ;;
    system)
        dest_dir=$(site_packages) || exit 1
        ;;
    target)
        dest_dir=$target
        ;;
    *) ;;
esac
dest_file=$dest_dir/$MODULE.py

# A pip-installed copy has a .dist-info record that a bare copy or removal
# would leave lying; let pip manage it.
pip_record=
for record in "$dest_dir/$MODULE"-*.dist-info; do
    [ -e "$record" ] && pip_record=$record
done

# --- Uninstall ----------------------------------------------------------------

if [ "$uninstall" = yes ]; then
    if [ ! -e "$dest_file" ]; then
        say "Nothing to remove: there is no $MODULE.py in $dest_dir."
        exit 0
    fi
    dest_dir=$(CDPATH='' cd -- "$dest_dir" && pwd -P) || fail 1 "cannot enter $dest_dir"
    dest_file=$dest_dir/$MODULE.py
    if [ -n "$pip_record" ]; then
        fail 1 "pip installed $MODULE in $dest_dir ($pip_record);" \
            "remove it with: $python -m pip uninstall isstreamer-lite"
    fi
    if [ -f "$source_file" ] && [ "$dest_dir" = "$script_dir" ]; then
        fail 1 "$dest_file is the file this script installs from; not removing it"
    fi
    rm -f -- "$dest_file" || fail 1 "could not remove $dest_file"
    say "Removed $dest_file"
    for cached in "$dest_dir/__pycache__/$MODULE".*.pyc; do
        if [ -e "$cached" ]; then
            rm -f -- "$cached" && say "Removed $cached"
        fi
    done
    # __pycache__ goes too once nothing else is cached there.
    rmdir -- "$dest_dir/__pycache__" 2>/dev/null || :
    exit 0
fi

# --- Install ------------------------------------------------------------------

if [ -n "$pip_record" ]; then
    fail 1 "pip installed $MODULE in $dest_dir ($pip_record);" \
        "upgrade it with pip, or run '$python -m pip uninstall isstreamer-lite' first"
fi

if [ ! -d "$dest_dir" ]; then
    (umask 022 && mkdir -p -- "$dest_dir") || fail 1 "could not create $dest_dir"
    say "Created $dest_dir"
fi
dest_dir=$(CDPATH='' cd -- "$dest_dir" && pwd -P) || fail 1 "cannot enter $dest_dir"
dest_file=$dest_dir/$MODULE.py

temp_file=
work_dir=
cleanup() {
    [ -z "$temp_file" ] || rm -f -- "$temp_file"
    [ -z "$work_dir" ] || rm -rf -- "$work_dir"
}
trap cleanup EXIT
trap 'exit 1' HUP INT PIPE TERM

# What the run replaces, read as text (the installed file is not imported).
old_version=
replacing=no
if [ -f "$dest_file" ]; then
    replacing=yes
    old_version=$(sed -n 's/^__version__ = "\([^"]*\)".*$/\1/p' "$dest_file" | head -n 1)
fi

if [ -f "$dest_file" ] && cmp -s -- "$source_file" "$dest_file"; then
    say "$MODULE $version is already installed in $dest_dir (identical file)."
else
    # Copy next to the destination, then rename: a reader never sees half a module.
    temp_file=$dest_dir/.$MODULE.py.$$.tmp
    if ! cp -- "$source_file" "$temp_file" 2>/dev/null; then
        temp_file=
        if [ "$mode" = system ] && [ "$(id -u)" != 0 ]; then
            fail 1 "cannot write to $dest_dir; run it as root (sudo sh $PROG --system)," \
                "or install for this user only (sh $PROG)"
        fi
        fail 1 "cannot write to $dest_dir"
    fi
    chmod 644 "$temp_file" || fail 1 "could not make $temp_file readable"
    mv -f -- "$temp_file" "$dest_file" ||
        fail 1 "could not move the new file into place as $dest_file"
    temp_file=
    cmp -s -- "$source_file" "$dest_file" ||
        fail 1 "$dest_file differs from $source_file after copying (disk full?)"
    if [ "$replacing" = no ]; then
        say "Installed $MODULE $version to $dest_file"
    elif [ -z "$old_version" ]; then
        say "Replaced $dest_file (it had no __version__ line) with $MODULE $version"
    elif [ "$old_version" = "$version" ]; then
        say "Reinstalled $MODULE $version in $dest_file (the installed copy differed)"
    else
        # Compare the release numbers (1.0.1 of 1.0.1rc2); a tie just replaces.
        change=$("$python" -c 'import re, sys
old, new = [[int(n) for n in re.match(r"[0-9.]*", v).group().split(".") if n]
            for v in sys.argv[1:3]]
print("Upgraded" if new > old else "Downgraded" if new < old else "Replaced")' \
            "$old_version" "$version") || change=Replaced
        say "$change $MODULE $old_version -> $version in $dest_file"
    fi
fi

# --- Precompile -----------------------------------------------------------------

# Bytecode for this interpreter's cache tag in __pycache__ beside the module,
# written by the installer (who may write there), so that Python never has to
# compile it at import: on a read-only image, for another user or with
# PYTHONDONTWRITEBYTECODE=1 it would otherwise compile it at every start.
if cached_file=$(umask 022 && "$python" -c 'import py_compile, sys
try:
    print(py_compile.compile(sys.argv[1], doraise=True))
except (py_compile.PyCompileError, OSError) as exc:
    sys.exit(str(exc))' "$dest_file"); then
    say "Precompiled $cached_file"
else
    warn "could not precompile $dest_file; $python will compile it at every" \
        "start where it cannot write its __pycache__"
fi

# --- Smoke test -----------------------------------------------------------------

# Run from an empty folder so the current directory cannot shadow the copy.
work_dir=$(mktemp -d "${TMPDIR:-/tmp}/$MODULE-install.XXXXXX") ||
    fail 1 "could not create a temporary folder"
search_path=${PYTHONPATH-}
if [ "$mode" = target ]; then
    search_path=$dest_dir${PYTHONPATH:+:$PYTHONPATH}
fi

imported_from() {
    # imported_from [VAR=VALUE...]: the file $python imports $MODULE from, run
    # from the empty folder with those variables set.
    (cd -- "$work_dir" && env PYTHONPATH="$search_path" PYTHONDONTWRITEBYTECODE=1 "$@" \
        "$python" -c "import os, $MODULE; print(os.path.realpath($MODULE.__file__))" \
        2>/dev/null)
}
found=$(imported_from)
if [ "$found" != "$dest_file" ]; then
    warn "$python imports $MODULE from ${found:-nowhere}, not from $dest_file;" \
        "that copy comes first on sys.path (PYTHONPATH, or a pip install?)"
fi
# Under sudo, the user who ran it has a user site-packages of their own, which
# comes before site-packages on sys.path: a copy there hides this one from them.
case ${SUDO_USER-} in
    '' | root | *[!A-Za-z0-9._-]*) sudo_home= ;;
    *) sudo_home=$(getent passwd "$SUDO_USER" 2>/dev/null | cut -d: -f6) ;;
esac
if [ -n "$sudo_home" ] && [ "$mode" != target ]; then
    theirs=$(imported_from HOME="$sudo_home" PYTHONUSERBASE=)
    if [ -n "$theirs" ] && [ "$theirs" != "$dest_file" ]; then
        warn "for $SUDO_USER, $python imports $MODULE from $theirs, not from" \
            "$dest_file: that copy comes first on their sys.path. Remove it (as" \
            "$SUDO_USER: sh $0 --python $python --uninstall) to use this one."
    fi
fi
say "Running the smoke test: $python -m $MODULE"
(cd -- "$work_dir" && PYTHONPATH=$search_path PYTHONDONTWRITEBYTECODE=1 \
    "$python" -m "$MODULE") || {
    status=$?
    fail 1 "the smoke test failed (exit status $status) with Python $python_version;" \
        "$MODULE.py is installed in $dest_dir"
}

say ""
say "Done: $MODULE $version for Python $python_version ($python) is in $dest_dir."
if [ "$mode" = target ]; then
    say "Python imports it from there only with that folder on its path:"
    say "  PYTHONPATH='$dest_dir' $python your_script.py"
    say "or, in the script, before the import:"
    say "  import sys; sys.path.insert(0, \"$dest_dir\")"
fi
say "Use it with:"
say "  from $MODULE import Streamer"
