"""The kernel corner: thin wrappers over SG_IO, device-mapper ioctls, udev and sysfs.

Nothing here decides anything; the orchestration above receives these as
collaborators, so host tests can hand it fakes.
"""
