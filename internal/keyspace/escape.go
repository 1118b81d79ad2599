package keyspace

import (
	"errors"
	"strings"
)

// escape turns a validated name into one key segment. Every byte outside
// [A-Za-z0-9_-] becomes %XX (upper-case hex), so the result never contains
// "/" or ".", cannot be "." or "..", and distinct names give distinct
// segments: unescape inverts it exactly.
func escape(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if isPlain(c) {
			b.WriteByte(c)
			continue
		}
		const hex = "0123456789ABCDEF"
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&0xF])
	}
	return b.String()
}

func isPlain(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_'
}

var errBadEscape = errors.New("malformed escaped segment")

// unescape inverts escape. It accepts only what escape produces, so every
// segment decodes to at most one name.
func unescape(seg string) (string, error) {
	var b strings.Builder
	b.Grow(len(seg))
	for i := 0; i < len(seg); i++ {
		c := seg[i]
		if isPlain(c) {
			b.WriteByte(c)
			continue
		}
		if c != '%' || i+2 >= len(seg) {
			return "", errBadEscape
		}
		hi, lo := unhex(seg[i+1]), unhex(seg[i+2])
		if hi < 0 || lo < 0 {
			return "", errBadEscape
		}
		v := byte(hi<<4 | lo)
		if isPlain(v) {
			return "", errBadEscape
		}
		b.WriteByte(v)
		i += 2
	}
	return b.String(), nil
}

func unhex(c byte) int {
	switch {
	case '0' <= c && c <= '9':
		return int(c - '0')
	case 'A' <= c && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}
