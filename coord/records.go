package coord

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"time"

	"github.com/batonhq/baton/internal/keyspace"
)

// RecordVersion is the format version of every record this baton writes.
// Decoding refuses any other version rather than guess at its meaning.
const RecordVersion = 1

// maxRecordBytes bounds what a decoder accepts; real records are a few
// hundred bytes.
const maxRecordBytes = 64 << 10

// The transport protocols of PowerJob's workers: a worker names one in
// its acquire request (PowerJob's default is AKKA) and is sent to the
// owner's address for it. Any other name works the same way.
const (
	ProtocolHTTP = "HTTP"
	ProtocolAKKA = "AKKA"
)

// Endpoint is one address of a server. Address is what other servers and
// workers on the same network dial; ExternalAddress, when set, is the
// address handed to workers that reach the server through NAT.
type Endpoint struct {
	Address         string `json:"address"`
	ExternalAddress string `json:"externalAddress,omitempty"`
	// TLS says the endpoint speaks TLS: for a control endpoint, HTTPS.
	TLS bool `json:"tls,omitempty"`
}

// URL is the base URL of a control endpoint as workers reach it
// ("https://" + ForWorkers() with TLS, else "http://").
func (e Endpoint) URL() string { return e.scheme() + "://" + e.ForWorkers() }

// PeerURL is the base URL of a control endpoint as other servers reach it
// (its Address).
func (e Endpoint) PeerURL() string { return e.scheme() + "://" + e.Address }

func (e Endpoint) scheme() string {
	if e.TLS {
		return "https"
	}
	return "http"
}

// ForWorkers is the address to give a worker: ExternalAddress when set,
// else Address.
func (e Endpoint) ForWorkers() string {
	if e.ExternalAddress != "" {
		return e.ExternalAddress
	}
	return e.Address
}

// Protocols maps a transport protocol name ("HTTP", "AKKA") to where the
// server receives its workers' traffic in that protocol (PowerJob's
// heartbeats, status and log reports): the address a worker's acquire
// returns. It is not where baton's own endpoints answer (see the records'
// Control).
type Protocols map[string]Endpoint

// AppRecord is stored under both apps/names/{name} and apps/ids/{id}.
type AppRecord struct {
	Version   int       `json:"version"`
	ID        int64     `json:"id"`
	Name      string    `json:"name"`
	CreatedAt time.Time `json:"createdAt"`
}

// OwnerRecord is the value of current-server/{appId}: which server owns
// the app and how to reach it. It is written once per ownership and bound
// to the owner's lease; its ModRevision is the ownership's fencing token.
type OwnerRecord struct {
	Version  int    `json:"version"`
	ServerID string `json:"serverId"`
	// Control is where the owner answers baton's endpoints (/server/*
	// for workers' discovery, /friend/ping for peers).
	Control   Endpoint  `json:"control"`
	Protocols Protocols `json:"protocols"`
	// TTLMillis is the owner's lease TTL: how long a server that overwrites
	// this record while the lease is alive must wait before acting.
	TTLMillis  int64     `json:"ttlMillis"`
	AcquiredAt time.Time `json:"acquiredAt"`
	// HandedOverFrom, when set, is the token of the ownership whose holder
	// wrote this record for the new owner (a handover): that holder had
	// stopped acting before the write, so the new owner need not wait.
	HandedOverFrom int64 `json:"handedOverFrom,omitempty"`
}

// DisplacedRecord is the value of a displacement marker,
// displaced/{appId}/{leaseHex}: the owner whose live key was overwritten,
// and the token of the ownership that ended there. ServerID is empty when
// the overwritten record could not be decoded.
type DisplacedRecord struct {
	Version  int    `json:"version"`
	ServerID string `json:"serverId,omitempty"`
	Token    int64  `json:"token"`
}

// Encode returns the record as JSON with Version set.
func (r DisplacedRecord) Encode() ([]byte, error) {
	r.Version = RecordVersion
	if r.Token <= 0 {
		return nil, fmt.Errorf("%w: displaced token %d is not positive", ErrCorruptRecord, r.Token)
	}
	return json.Marshal(r)
}

// ServerRecord is the value of servers/{serverId}, bound to the server's
// lease: the server is a live member while it exists.
type ServerRecord struct {
	Version  int    `json:"version"`
	ServerID string `json:"serverId"`
	// Control is where the server answers baton's endpoints; Protocols
	// are its transport addresses, as in OwnerRecord.
	Control   Endpoint  `json:"control"`
	Protocols Protocols `json:"protocols"`
	StartedAt time.Time `json:"startedAt"`
	// Software is the baton version the server runs, for diagnostics.
	Software string `json:"software,omitempty"`
	// Weight is the server's share of apps relative to the others'
	// (RankWeighted); absent or 0 means 1.
	Weight float64 `json:"weight,omitempty"`
	// Cordoned servers take no new apps, and hand theirs on (balance).
	Cordoned bool `json:"cordoned,omitempty"`
}

// PlacementWeight is the weight RankWeighted uses for the server: 0 when
// cordoned, else Weight (1 when unset).
func (r ServerRecord) PlacementWeight() float64 {
	switch {
	case r.Cordoned:
		return 0
	case r.Weight == 0:
		return 1
	}
	return r.Weight
}

// Encode returns the record as JSON with Version set.
func (r AppRecord) Encode() ([]byte, error) {
	r.Version = RecordVersion
	if err := r.validate(); err != nil {
		return nil, err
	}
	return json.Marshal(r)
}

// Encode returns the record as JSON with Version set.
func (r OwnerRecord) Encode() ([]byte, error) {
	r.Version = RecordVersion
	if err := r.validate(); err != nil {
		return nil, err
	}
	return json.Marshal(r)
}

// Encode returns the record as JSON with Version set.
func (r ServerRecord) Encode() ([]byte, error) {
	r.Version = RecordVersion
	if err := r.validate(); err != nil {
		return nil, err
	}
	return json.Marshal(r)
}

// DecodeAppRecord decodes an app record strictly: unknown fields, another
// version, missing fields or trailing data give ErrCorruptRecord.
func DecodeAppRecord(data []byte) (AppRecord, error) {
	var r AppRecord
	err := decodeStrict(data, &r, func() error { return r.validateDecoded() })
	return r, err
}

// DecodeOwnerRecord decodes an owner record as strictly as DecodeAppRecord.
func DecodeOwnerRecord(data []byte) (OwnerRecord, error) {
	var r OwnerRecord
	err := decodeStrict(data, &r, func() error { return r.validateDecoded() })
	return r, err
}

// DecodeServerRecord decodes a server record as strictly as
// DecodeAppRecord.
func DecodeServerRecord(data []byte) (ServerRecord, error) {
	var r ServerRecord
	err := decodeStrict(data, &r, func() error { return r.validateDecoded() })
	return r, err
}

func decodeStrict(data []byte, v any, validate func() error) error {
	if len(data) > maxRecordBytes {
		return fmt.Errorf("%w: %d bytes, at most %d are allowed", ErrCorruptRecord, len(data), maxRecordBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrCorruptRecord, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: trailing data after the record", ErrCorruptRecord)
	}
	if err := validate(); err != nil {
		return fmt.Errorf("%w: %v", ErrCorruptRecord, err)
	}
	return nil
}

func checkVersion(v int) error {
	if v != RecordVersion {
		return fmt.Errorf("record version %d, this baton reads version %d", v, RecordVersion)
	}
	return nil
}

func (r *AppRecord) validateDecoded() error {
	if err := checkVersion(r.Version); err != nil {
		return err
	}
	return r.validate()
}

func (r AppRecord) validate() error {
	if r.ID <= 0 {
		return fmt.Errorf("app id %d is not positive", r.ID)
	}
	if err := keyspace.ValidateName("app name", r.Name); err != nil {
		return err
	}
	if r.CreatedAt.IsZero() {
		return errors.New("app record has no createdAt")
	}
	return nil
}

func (r *OwnerRecord) validateDecoded() error {
	if err := checkVersion(r.Version); err != nil {
		return err
	}
	return r.validate()
}

func (r OwnerRecord) validate() error {
	if err := keyspace.ValidateName("server id", r.ServerID); err != nil {
		return err
	}
	if r.Control.Address == "" {
		return errors.New("owner record has no control address")
	}
	if err := r.Protocols.validate(); err != nil {
		return err
	}
	if r.TTLMillis <= 0 {
		return fmt.Errorf("ttlMillis %d is not positive", r.TTLMillis)
	}
	if r.AcquiredAt.IsZero() {
		return errors.New("owner record has no acquiredAt")
	}
	if r.HandedOverFrom < 0 {
		return fmt.Errorf("handedOverFrom %d is negative", r.HandedOverFrom)
	}
	return nil
}

// TTL is the owner's lease TTL as a duration.
func (r OwnerRecord) TTL() time.Duration { return time.Duration(r.TTLMillis) * time.Millisecond }

func (r *ServerRecord) validateDecoded() error {
	if err := checkVersion(r.Version); err != nil {
		return err
	}
	return r.validate()
}

func (r ServerRecord) validate() error {
	if err := keyspace.ValidateName("server id", r.ServerID); err != nil {
		return err
	}
	if r.Control.Address == "" {
		return errors.New("server record has no control address")
	}
	if err := r.Protocols.validate(); err != nil {
		return err
	}
	if r.StartedAt.IsZero() {
		return errors.New("server record has no startedAt")
	}
	if r.Weight < 0 || math.IsNaN(r.Weight) || math.IsInf(r.Weight, 0) {
		return fmt.Errorf("weight %v is not a finite non-negative number", r.Weight)
	}
	return nil
}

// validate requires at least one protocol and a name and an address for
// each.
func (p Protocols) validate() error {
	if len(p) == 0 {
		return errors.New("no protocol listed")
	}
	for name, ep := range p {
		if err := keyspace.ValidateName("protocol name", name); err != nil {
			return err
		}
		if ep.Address == "" {
			return fmt.Errorf("protocol %q has no address", name)
		}
	}
	return nil
}

// Validate reports whether p can be published: at least one protocol,
// each named and addressed.
func (p Protocols) Validate() error { return p.validate() }
