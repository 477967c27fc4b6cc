"""toy: accepts one user with one password (a demonstration of a whole backend in one module)."""

from auth_backends.declaration import TEXT, Backend, Option
from ofmipd.auth import Outcome, Secret, accept, reject
from ofmipd.config import BackendSpec
from ofmipd.identity import ClientIdentity

BACKEND = Backend(
    "toy",
    module="auth_backends.kinds.toy",
    flags=("--toy",),
    metavar="USER",
    arg="user",
    help="one user whose password is the user name reversed",
    options=(Option("user", TEXT, "the one user", required="needs user = NAME"),),
)


class Toy:
    name = "toy"

    def __init__(self, user: str) -> None:
        self.user = self.target = user

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome:
        if user == self.user and secret.matches(user[::-1].encode()):
            return accept("password matches", user)
        return reject("not the toy user")


def create(spec: BackendSpec) -> Toy:
    return Toy(BACKEND.settings(spec)["user"])
