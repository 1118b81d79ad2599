// Package keyspace is baton's etcd key layout (DESIGN.md, "Keyspace"):
// every key baton reads or writes is built and parsed here.
package keyspace

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Errors of the layout; coord re-exports them under the same names.
var (
	// ErrInvalidPrefix: a key prefix breaks a rule of New.
	ErrInvalidPrefix = errors.New("coord: invalid key prefix")
	// ErrInvalidAppName: an app name breaks a rule of ValidateName.
	ErrInvalidAppName = errors.New("coord: invalid app name")
	// ErrInvalidServerID: a server id breaks a rule of ValidateName.
	ErrInvalidServerID = errors.New("coord: invalid server id")
)

// DefaultPrefix is the key prefix baton uses when none is configured.
const DefaultPrefix = "/baton"

// MaxNameBytes is the longest app name or server id accepted, in bytes.
const MaxNameBytes = 128

// Keys is the etcd key layout of one baton deployment, all under one prefix:
//
//	{p}/apps/seq                   last allocated app id
//	{p}/apps/names/{escaped name}  app record
//	{p}/apps/ids/{id}              app record
//	{p}/current-server/{appId}     owner record, bound to the owner's lease
//	{p}/locks/{appId}/             concurrency.Mutex prefix of the app
//	{p}/servers/{escaped id}       server record, bound to the server's lease
//	{p}/displaced/{appId}/{lease}  displacement marker, bound to the displaced owner's lease
//
// Every user-supplied segment (app names, server ids) is validated and
// escaped so that it stays inside its own slot: it never contains a "/" and
// two different inputs never share a key. A Keys value is immutable and safe
// for concurrent use; the zero value is not valid, use New.
type Keys struct {
	prefix string
}

// New returns the layout under prefix. An empty prefix means
// DefaultPrefix. A prefix must start with "/", must not end with "/", and
// must not contain empty segments, "." or ".." segments, or control
// characters, so that two deployments with different prefixes never share a
// key.
func New(prefix string) (Keys, error) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if err := validatePrefix(prefix); err != nil {
		return Keys{}, err
	}
	return Keys{prefix: prefix}, nil
}

func validatePrefix(p string) error {
	switch {
	case len(p) > 512:
		return fmt.Errorf("%w: prefix is %d bytes, at most 512 are allowed", ErrInvalidPrefix, len(p))
	case !strings.HasPrefix(p, "/"):
		return fmt.Errorf("%w: prefix %q must start with \"/\"", ErrInvalidPrefix, p)
	case strings.HasSuffix(p, "/"):
		return fmt.Errorf("%w: prefix %q must not end with \"/\"", ErrInvalidPrefix, p)
	case !utf8.ValidString(p):
		return fmt.Errorf("%w: prefix %q is not valid UTF-8", ErrInvalidPrefix, p)
	}
	for _, seg := range strings.Split(p[1:], "/") {
		if seg == "" || seg == "." || seg == ".." {
			return fmt.Errorf("%w: prefix %q has an empty, \".\" or \"..\" segment", ErrInvalidPrefix, p)
		}
	}
	if i := strings.IndexFunc(p, unicode.IsControl); i >= 0 {
		return fmt.Errorf("%w: prefix %q has a control character at byte %d", ErrInvalidPrefix, p, i)
	}
	return nil
}

// Prefix returns the prefix every key of this layout starts with.
func (k Keys) Prefix() string { return k.prefix }

// AppSeq is the key holding the last allocated app id.
func (k Keys) AppSeq() string { return k.prefix + "/apps/seq" }

// AppNamePrefix is the prefix of all app-by-name records.
func (k Keys) AppNamePrefix() string { return k.prefix + "/apps/names/" }

// AppIDPrefix is the prefix of all app-by-id records.
func (k Keys) AppIDPrefix() string { return k.prefix + "/apps/ids/" }

// AppName is the key of the app record for name. It fails with
// ErrInvalidAppName when name breaks a rule of ValidateName.
func (k Keys) AppName(name string) (string, error) {
	if err := ValidateName("app name", name); err != nil {
		return "", fmt.Errorf("%w: %v", ErrInvalidAppName, err)
	}
	return k.AppNamePrefix() + escape(name), nil
}

// AppID is the key of the app record for id; id must be positive.
func (k Keys) AppID(id int64) string { return k.AppIDPrefix() + FormatID(id) }

// OwnerPrefix is the prefix of all owner keys; the server's one watch
// covers it.
func (k Keys) OwnerPrefix() string { return k.prefix + "/current-server/" }

// Owner is the key naming the server that currently owns app id.
func (k Keys) Owner(appID int64) string { return k.OwnerPrefix() + FormatID(appID) }

// DisplacedPrefix is the prefix of all displacement markers.
func (k Keys) DisplacedPrefix() string { return k.prefix + "/displaced/" }

// Displaced is the prefix of app id's displacement markers: while any key
// exists under it, no server may act for the app.
func (k Keys) Displaced(appID int64) string { return k.DisplacedPrefix() + FormatID(appID) + "/" }

// DisplacedMarker is the marker written when app id's owner key, bound to
// lease, is overwritten while the lease is alive; the marker is bound to
// that same lease.
func (k Keys) DisplacedMarker(appID int64, lease int64) string {
	return k.Displaced(appID) + strconv.FormatInt(lease, 16)
}

// ParseDisplacedMarker returns the app id and the displaced lease a
// marker key names.
func (k Keys) ParseDisplacedMarker(key string) (appID, lease int64, err error) {
	rest, ok := strings.CutPrefix(key, k.DisplacedPrefix())
	app, hex, found := strings.Cut(rest, "/")
	if !ok || !found {
		return 0, 0, fmt.Errorf("coord: key %q is not a displacement marker under %q", key, k.DisplacedPrefix())
	}
	if appID, err = parseID(app, ""); err != nil {
		return 0, 0, err
	}
	lease, err = strconv.ParseInt(hex, 16, 64)
	if err != nil || lease <= 0 || strconv.FormatInt(lease, 16) != hex {
		return 0, 0, fmt.Errorf("coord: key %q does not end in a lease id", key)
	}
	return appID, lease, nil
}

// OwnershipRange is the key range [start, end) holding every owner key and
// every displacement marker, and no other key of the layout: a server's
// one watch covers it, so that owner keys and markers reach the server in
// one order.
func (k Keys) OwnershipRange() (start, end string) {
	// "current-server/" < "displaced/" and no other segment of the layout
	// sorts between them; "0" is the byte after "/".
	return k.OwnerPrefix(), k.prefix + "/displaced0"
}

// IsOwnerKey reports whether key is under the owner prefix.
func (k Keys) IsOwnerKey(key string) bool { return strings.HasPrefix(key, k.OwnerPrefix()) }

// Lock is the concurrency.Mutex prefix of app id.
func (k Keys) Lock(appID int64) string { return k.prefix + "/locks/" + FormatID(appID) + "/" }

// ServerPrefix is the prefix of all live-server records.
func (k Keys) ServerPrefix() string { return k.prefix + "/servers/" }

// Server is the membership key of server id. It fails with
// ErrInvalidServerID when id breaks a rule of ValidateName.
func (k Keys) Server(id string) (string, error) {
	if err := ValidateName("server id", id); err != nil {
		return "", fmt.Errorf("%w: %v", ErrInvalidServerID, err)
	}
	return k.ServerPrefix() + escape(id), nil
}

// AppIDFromOwnerKey returns the app id an owner key belongs to.
func (k Keys) AppIDFromOwnerKey(key string) (int64, error) {
	return parseID(key, k.OwnerPrefix())
}

// AppIDFromIDKey returns the app id of an app-by-id record key.
func (k Keys) AppIDFromIDKey(key string) (int64, error) {
	return parseID(key, k.AppIDPrefix())
}

// ServerIDFromKey returns the server id a membership key belongs to.
func (k Keys) ServerIDFromKey(key string) (string, error) {
	seg, ok := strings.CutPrefix(key, k.ServerPrefix())
	if !ok {
		return "", fmt.Errorf("coord: key %q is not under %q", key, k.ServerPrefix())
	}
	id, err := unescape(seg)
	if err != nil {
		return "", fmt.Errorf("coord: key %q: %w", key, err)
	}
	return id, nil
}

// ValidateName reports whether s is acceptable as an app name or a server
// id: 1 to MaxNameBytes bytes of valid UTF-8 with no control characters.
// what names s in the error ("app name", "server id").
func ValidateName(what, s string) error {
	switch {
	case s == "":
		return fmt.Errorf("%s must not be empty", what)
	case len(s) > MaxNameBytes:
		return fmt.Errorf("%s is %d bytes, at most %d are allowed", what, len(s), MaxNameBytes)
	case !utf8.ValidString(s):
		return fmt.Errorf("%s %q is not valid UTF-8", what, s)
	}
	if i := strings.IndexFunc(s, unicode.IsControl); i >= 0 {
		return fmt.Errorf("%s %q has a control character at byte %d", what, s, i)
	}
	return nil
}

// FormatID is the key segment of an app id.
func FormatID(id int64) string { return strconv.FormatInt(id, 10) }

func parseID(key, prefix string) (int64, error) {
	seg, ok := strings.CutPrefix(key, prefix)
	if !ok {
		return 0, fmt.Errorf("coord: key %q is not under %q", key, prefix)
	}
	id, err := strconv.ParseInt(seg, 10, 64)
	if err != nil || id <= 0 || FormatID(id) != seg {
		return 0, fmt.Errorf("coord: key %q does not end in a positive id", key)
	}
	return id, nil
}
