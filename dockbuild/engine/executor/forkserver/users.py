"""USER in the container: names and groups looked up in its own /etc/passwd and /etc/group."""

from __future__ import annotations

from .syscalls import SetupError

# ---------------------------------------------------------------------------------------
# USER


class User:
    def __init__(self, uid: int, gid: int, groups: list[int], home: str) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = groups
        self.home = home

    def __repr__(self) -> str:
        return f"User(uid={self.uid}, gid={self.gid}, groups={self.groups}, home={self.home!r})"


def _read_db(path: str, fields: int) -> list[list[str]]:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            row = line.split(":")
            if len(row) >= fields:
                rows.append(row)
    return rows


def resolve_user(spec: str, passwd_path: str, group_path: str) -> User:
    """Resolve "name[:group]" or "uid[:gid]" the way runc does (BuildKit uses runc's code).

    "" is root. A numeric uid or gid needs no entry in the files; a name does. Without an
    explicit group, the supplementary groups are those that list the user as a member.
    """
    name, has_group, group = spec.partition(":")
    passwd = _read_db(passwd_path, 7)
    entry = None
    for row in passwd:
        if (name == "" and row[2] == "0") or row[0] == name or (name.isdigit() and row[2] == name):
            entry = row
            break
    if entry is not None:
        user_name, uid, gid, home = entry[0], int(entry[2]), int(entry[3]), entry[5] or "/"
    elif name == "" or name.isdigit():
        user_name, uid, gid, home = None, int(name or 0), 0, "/"
    else:
        raise SetupError(f"unable to find user {name}: no matching entries in passwd file")
    groups_db = _read_db(group_path, 4)
    if has_group:
        for row in groups_db:
            if row[0] == group or (group.isdigit() and row[2] == group):
                gid = int(row[2])
                break
        else:
            if not group.isdigit():
                raise SetupError(f"unable to find group {group}: no matching entries in group file")
            gid = int(group)
        groups = [gid]
    else:
        groups = [gid]
        if user_name is not None:
            for row in groups_db:
                if (
                    user_name in row[3].split(",")
                    and row[2].isdigit()
                    and int(row[2]) not in groups
                ):
                    groups.append(int(row[2]))
    return User(uid, gid, groups, home)
