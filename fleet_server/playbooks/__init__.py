"""Playbook runs: Ansible content from playbooks/ run through ansible-runner, recorded per task."""
