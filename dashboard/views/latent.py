"""placeholder"""
from dash import html


def layout(ctx):
    return html.Div(id="latent-body")


def register(app, ctx):
    pass
