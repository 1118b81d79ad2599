package server

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"

	"github.com/batonhq/baton/coord"
)

// Request parameters are validated before anything reaches etcd; an error
// here is a 400.

// rawAppName reads appName from a raw query as a PowerJob worker sends
// it: formatted into the URL unencoded (OkHttp then encodes only what a
// URL cannot hold), so "+" is a plus and ";" is part of the name — not a
// space and a separator, as form decoding (url.ParseQuery) would have
// them. Names holding "&" or "#" cannot be sent by a PowerJob worker at
// all.
func rawAppName(rawQuery string) (string, error) {
	var found []string
	for _, pair := range strings.Split(rawQuery, "&") {
		k, v, _ := strings.Cut(pair, "=")
		if key, err := url.PathUnescape(k); err != nil || key != "appName" {
			continue
		}
		name, err := url.PathUnescape(v)
		if err != nil {
			return "", fmt.Errorf("appName %q: %v", truncate(v), err)
		}
		found = append(found, name)
	}
	switch {
	case len(found) == 0 || found[0] == "":
		return "", fmt.Errorf("appName is required")
	case len(found) > 1:
		return "", fmt.Errorf("appName is given %d times", len(found))
	}
	return found[0], nil
}

func appIDParam(q url.Values) (int64, error) {
	s, err := single(q, "appId")
	if err != nil {
		return 0, err
	}
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil || id <= 0 {
		return 0, fmt.Errorf("appId %q is not a positive 64-bit integer", truncate(s))
	}
	return id, nil
}

// protocolParam is the transport protocol a worker asks for; a PowerJob
// server takes a missing one as AKKA, its workers' default.
func protocolParam(q url.Values) (string, error) {
	if len(q["protocol"]) == 0 {
		return coord.ProtocolAKKA, nil
	}
	p, err := single(q, "protocol")
	if err != nil {
		return "", err
	}
	if err := coord.ValidateName(p); err != nil {
		return "", fmt.Errorf("protocol %q is not a protocol name", truncate(p))
	}
	return p, nil
}

// hostPortParam reads an optional host:port parameter ("" when absent).
func hostPortParam(q url.Values, name string) (string, error) {
	vs := q[name]
	if len(vs) == 0 || vs[0] == "" && len(vs) == 1 {
		return "", nil
	}
	if len(vs) > 1 {
		return "", fmt.Errorf("%s is given %d times", name, len(vs))
	}
	hp, err := parseHostPort(vs[0])
	if err != nil {
		return "", fmt.Errorf("%s %q: %v", name, truncate(vs[0]), err)
	}
	return hp, nil
}

func validHostPort(s string) error {
	_, err := parseHostPort(s)
	return err
}

// parseHostPort splits host:port, accepting besides the usual forms an
// IPv6 address without brackets ("fe80::1:10010"), as PowerJob writes
// them: the port is what follows the last colon. It returns the address
// in its canonical form.
func parseHostPort(s string) (string, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		i := strings.LastIndexByte(s, ':')
		ip, perr := netip.ParseAddr(s[:max(i, 0)])
		if i < 0 || perr != nil || !ip.Is6() {
			return "", err
		}
		host, port = ip.String(), s[i+1:]
	}
	if host == "" || len(host) > 253 {
		return "", fmt.Errorf("bad host")
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return "", fmt.Errorf("bad port")
	}
	return net.JoinHostPort(host, port), nil
}

// single returns the one value of a required parameter.
func single(q url.Values, name string) (string, error) {
	vs := q[name]
	switch {
	case len(vs) == 0 || vs[0] == "":
		return "", fmt.Errorf("%s is required", name)
	case len(vs) > 1:
		return "", fmt.Errorf("%s is given %d times", name, len(vs))
	}
	return vs[0], nil
}

// truncate keeps error messages short whatever the input.
func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
