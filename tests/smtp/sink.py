"""An SMTP server for the tests (aiosmtpd): writes each message it accepts to DIR/<n>.eml,
its envelope to DIR/<n>.json, and prints "ready" once it listens.

    python sink.py PORT DIR plain|starttls|implicit|count [CERT KEY]

"count" (for benchmarks) is plain SMTP keeping no message: DIR/count holds how many arrived.
"""
import json
import os
import ssl
import sys
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

# Sydent hands smtplib its rendered template as bytes, which smtplib sends as they are: with
# the templates' bare LF line ends, the whole message is one SMTP line, far over RFC 5321's
# 1000 octets. Real MTAs take it; aiosmtpd refuses unless told otherwise.
SMTP.line_length_limit = 1 << 20

port, out_dir, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
count = 0


class Save:
    async def handle_DATA(self, server, session, envelope):
        global count
        count += 1
        if mode == "count":
            return "250 OK"
        base = os.path.join(out_dir, str(count))
        with open(base + ".json.tmp", "w") as f:
            json.dump({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                       "tls": session.ssl is not None or mode == "implicit"}, f)
        with open(base + ".eml", "wb") as f:
            f.write(envelope.original_content or envelope.content)
        os.rename(base + ".json.tmp", base + ".json")
        return "250 OK"


context = None
if mode not in ("plain", "count"):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(sys.argv[4], sys.argv[5])


class StartTls(Controller):
    def factory(self):
        return SMTP(self.handler, tls_context=context, require_starttls=True)


if mode == "starttls":
    controller = StartTls(Save(), hostname="127.0.0.1", port=port)
elif mode == "implicit":
    controller = Controller(Save(), hostname="127.0.0.1", port=port, ssl_context=context)
else:
    controller = Controller(Save(), hostname="127.0.0.1", port=port)
controller.start()
print("ready", flush=True)
while True:
    if mode == "count":
        with open(os.path.join(out_dir, "count.tmp"), "w") as f:
            f.write(str(count))
        os.rename(os.path.join(out_dir, "count.tmp"), os.path.join(out_dir, "count"))
        time.sleep(0.2)
    else:
        time.sleep(3600)
