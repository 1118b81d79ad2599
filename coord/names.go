package coord

import "github.com/batonhq/baton/internal/keyspace"

// DefaultPrefix is the etcd key prefix baton uses when none is configured.
const DefaultPrefix = keyspace.DefaultPrefix

// MaxNameBytes is the longest app name or server id accepted, in bytes.
const MaxNameBytes = keyspace.MaxNameBytes

// ValidateName reports whether s is acceptable as an app name or a server
// id: 1 to MaxNameBytes bytes of valid UTF-8 with no control characters.
func ValidateName(s string) error { return keyspace.ValidateName("name", s) }

// ValidatePrefix reports whether p is acceptable as an etcd key prefix (""
// means DefaultPrefix): it starts with "/", does not end with "/", and has
// no empty, "." or ".." segment and no control character, so that two
// deployments with different prefixes never share a key. It fails with
// ErrInvalidPrefix.
func ValidatePrefix(p string) error {
	_, err := keyspace.New(p)
	return err
}
