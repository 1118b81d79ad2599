package coord

import (
	"errors"

	"github.com/batonhq/baton/internal/keyspace"
)

// Errors returned by this package. Test for them with errors.Is; most are
// wrapped with details.
var (
	// ErrInvalidPrefix: a key prefix breaks a rule of ValidatePrefix.
	ErrInvalidPrefix = keyspace.ErrInvalidPrefix
	// ErrInvalidAppName: an app name breaks a rule of ValidateName.
	ErrInvalidAppName = keyspace.ErrInvalidAppName
	// ErrInvalidServerID: a server id breaks a rule of ValidateName.
	ErrInvalidServerID = keyspace.ErrInvalidServerID
	// ErrUnknownApp: no app is registered under that name or id.
	ErrUnknownApp = errors.New("coord: unknown app")
	// ErrCorruptRecord: a value read from etcd is not a record this
	// version of baton can decode.
	ErrCorruptRecord = errors.New("coord: corrupt record")
	// ErrInvalidConfig: a configuration field is out of range; the message
	// names the field and its value.
	ErrInvalidConfig = errors.New("invalid configuration")
	// ErrUnconfirmed: the session's guard deadline has passed; the server
	// must not act as owner until a new round confirms its lease.
	ErrUnconfirmed = errors.New("coord: lease unconfirmed")
	// ErrLeaseLost: etcd no longer has the session's lease (expired or
	// revoked); everything bound to it is gone.
	ErrLeaseLost = errors.New("coord: lease lost")
	// ErrSessionClosed: the session was closed.
	ErrSessionClosed = errors.New("coord: session closed")
)
