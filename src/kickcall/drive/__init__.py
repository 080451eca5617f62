"""Drivers without a VM: front-ends that exercise a back-end directly (``kickcall vhost-user-test``)."""
