"""Side-by-side benchmark: ofmipd vs bare aiosmtpd vs Postfix+Dovecot (`python -m bench`)."""
