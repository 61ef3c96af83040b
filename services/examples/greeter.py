"""A complete plug-in service: greets people, counts greetings, announces each one on the bus."""

from __future__ import annotations

import asyncio
import os

from services.base import Service, rpc


class Greeter(Service):
    """Say hello. Configure the greeting with ``[services.<name>.config] greeting = "..."``."""

    async def setup(self) -> None:
        self.greeting = self.config.get("greeting", "Hello")
        self.greeted = 0

    @rpc
    def greet(self, name: str) -> dict:
        """A greeting from one replica; each one is also published as ``greeter.greeted``."""
        self.greeted += 1
        self.publish("greeter.greeted", {"name": name, "replica": self.replica, "count": self.greeted})
        return {"message": f"{self.greeting}, {name}!", "replica": self.replica, "pid": os.getpid()}

    @rpc
    async def greet_slowly(self, name: str, delay: float = 0.5) -> str:
        """Async handlers run as tasks: other calls are served while this one waits."""
        await asyncio.sleep(delay)
        return f"{self.greeting}... {name}."

    @rpc
    def stats(self) -> dict:
        return {"replica": self.replica, "greeted": self.greeted}
