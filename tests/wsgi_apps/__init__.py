"""The shared test app as a plain WSGI app and as a Flask app, plus a WSGI driver."""
