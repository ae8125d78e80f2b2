"""Static files of the gateway's web page (index.html, app.js, style.css) and API docs page, served by http.py."""
