"""Side-by-side benchmark of ofmipd against bare aiosmtpd and Postfix+Dovecot (`python -m bench`)."""
