"""The backends' declarations, one module per kind, cheap to import: the command line of
every `ofmipd -1` is built from them, while their implementations (and python-ldap,
python-pam, libpass) are imported only for the kinds that are configured."""
