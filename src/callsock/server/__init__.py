"""Serving calls: connections, the hub they share, the aiohttp transport and routes, the ASGI adapter."""
