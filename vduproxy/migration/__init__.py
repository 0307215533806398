"""Live migration: the device-state blob, its restore through the control queue, cross-device checks.

Submodules are imported by name (`vduproxy.migration.state`, `.restore`, `.compat`): `compat` reaches the
software device's profiles lazily and `restore` needs trio, so nothing is pulled in here.
"""
