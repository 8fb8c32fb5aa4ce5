#!/usr/bin/env python3
"""Production size of src/ (run from the repository root: python3 .ci/metrics.py src testkit): lines per file with #[cfg(test)] items and tests.rs files removed,
and the longest fn bodies. Usage: metrics.py [src-dir] [exclude-substring...]"""
import os, re, sys

def scan(text):
    """Yield (index, char) of code chars: strings, chars and comments blanked."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith('//', i):
            j = text.find('\n', i)
            j = n if j < 0 else j
            for k in range(i, j): out[k] = ' '
            i = j
        elif text.startswith('/*', i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith('/*', j): depth += 1; j += 2
                elif text.startswith('*/', j): depth -= 1; j += 2
                else: j += 1
            for k in range(i, j):
                if out[k] != '\n': out[k] = ' '
            i = j
        elif re.match(r'b?r(#*)"', text[i:i+10]) and (i == 0 or not (text[i-1].isalnum() or text[i-1] == '_')):
            m = re.match(r'b?r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            j = n if j < 0 else j + len(end)
            for k in range(i, j):
                if out[k] != '\n': out[k] = ' '
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == '\\' else 1
            j += 1
            for k in range(i, min(j, n)):
                if out[k] != '\n': out[k] = ' '
            i = j
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            if m:
                for k in range(i, i + m.end()): out[k] = ' '
                i += m.end()
            else:
                i += 1
        else:
            i += 1
    return ''.join(out)

def match_brace(code, start):
    depth = 0
    for j in range(start, len(code)):
        if code[j] == '{': depth += 1
        elif code[j] == '}':
            depth -= 1
            if depth == 0: return j
    return len(code) - 1

def test_regions(code):
    regions = []
    for m in re.finditer(r'#\[cfg\(test\)\]', code):
        # the item after the attribute: up to ';' (a `mod tests;`) or a braced body
        j = m.end()
        while j < len(code) and code[j] not in '{;': j += 1
        if j < len(code) and code[j] == '{':
            regions.append((m.start(), match_brace(code, j)))
        else:
            regions.append((m.start(), j))
    return regions

def main():
    src = sys.argv[1] if len(sys.argv) > 1 else 'src'
    excl = sys.argv[2:]
    files, fns = [], []
    for root, _, names in os.walk(src):
        for name in names:
            if not name.endswith('.rs') or name == 'tests.rs': continue
            path = os.path.join(root, name)
            if any(e in path for e in excl): continue
            text = open(path).read()
            code = scan(text)
            regions = test_regions(code)
            in_test = lambda p: any(a <= p <= b for a, b in regions)
            lines = text.count('\n')
            test_lines = sum(code.count('\n', a, b + 1) for a, b in regions)
            files.append((lines - test_lines, path))
            for m in re.finditer(r'\bfn\s+(\w+)', code):
                if in_test(m.start()): continue
                j = m.end()
                while j < len(code) and code[j] not in '{;': j += 1
                if j >= len(code) or code[j] == ';': continue
                end = match_brace(code, j)
                fns.append((code.count('\n', m.start(), end) + 1, path + '::' + m.group(1)))
    files.sort(reverse=True); fns.sort(reverse=True)
    print('production lines:', sum(f[0] for f in files), 'in', len(files), 'files')
    print('largest files:'); [print('  %5d %s' % f) for f in files[:6]]
    print('longest fns:'); [print('  %5d %s' % f) for f in fns[:int(os.environ.get('TOP', '6'))]]

main()
