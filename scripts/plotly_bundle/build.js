// Bundle entry.js as plotly.js bundles its dist files (plotly.js's esbuild-config.js: the same
// plugins, aliases and target), minified, with a header naming the version and the licence.
'use strict';
const fs = require('fs');
const esbuild = require('esbuild');
const { environmentPlugin } = require('esbuild-plugin-environment');
const { glsl } = require('esbuild-plugin-glsl');
const InlineCSSPlugin = require('esbuild-plugin-inline-css');

const out = process.argv[2];
const version = require('plotly.js/package.json').version;
const traces = [...fs.readFileSync(__dirname + '/entry.js', 'utf8').matchAll(/plotly\.js\/lib\/(\w+)'\)/g)]
    .map((m) => m[1]).filter((t) => t !== 'core');

esbuild.build({
    entryPoints: [__dirname + '/entry.js'],
    outfile: out,
    format: 'iife',
    globalName: 'Plotly',
    bundle: true,
    minify: true,
    sourcemap: false,
    legalComments: 'inline',
    banner: { js: `/*! plotly.js v${version} (custom bundle of the Thinking Pixel dashboard: traces scatter,${traces.join(',')})` +
                  ' | Copyright 2012-2026, Plotly, Inc. | MIT License | built by scripts/plotly_bundle/build.sh */' },
    plugins: [InlineCSSPlugin(), glsl({ minify: true }), environmentPlugin({ NODE_DEBUG: false })],
    alias: { regl: '@plotly/regl', stream: 'stream-browserify' },
    define: { global: 'window', 'define.amd': 'false' },
    target: 'es2016',
    logLevel: 'info',
}).catch(() => process.exit(1));
