package coord_test

import (
	"errors"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
)

func TestRecordsRoundTrip(t *testing.T) {
	now := time.Date(2026, 11, 26, 3, 0, 0, 0, time.UTC)
	protos := coord.Protocols{coord.ProtocolHTTP: {Address: "10.0.0.1:7700", ExternalAddress: "203.0.113.9:7700"}}

	owner := coord.OwnerRecord{ServerID: "s1", Control: coord.Endpoint{Address: "10.0.0.1:7700"}, Protocols: protos, TTLMillis: 5000, AcquiredAt: now}
	data, err := owner.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := coord.DecodeOwnerRecord(data)
	if err != nil || got.ServerID != "s1" || got.TTL() != 5*time.Second || got.Version != coord.RecordVersion ||
		got.Protocols[coord.ProtocolHTTP] != protos[coord.ProtocolHTTP] || !got.AcquiredAt.Equal(now) {
		t.Fatalf("owner round trip: %+v, %v", got, err)
	}

	srv := coord.ServerRecord{ServerID: "s1", Control: coord.Endpoint{Address: "10.0.0.1:7700"}, Protocols: protos, StartedAt: now, Software: "dev"}
	data, _ = srv.Encode()
	if got, err := coord.DecodeServerRecord(data); err != nil || got.ServerID != "s1" || got.Software != "dev" {
		t.Fatalf("server round trip: %+v, %v", got, err)
	}

	app := coord.AppRecord{ID: 7, Name: "a/b", CreatedAt: now}
	data, _ = app.Encode()
	if got, err := coord.DecodeAppRecord(data); err != nil || got.ID != 7 || got.Name != "a/b" {
		t.Fatalf("app round trip: %+v, %v", got, err)
	}
}

func TestEncodeRefusesIncompleteRecords(t *testing.T) {
	if _, err := (coord.OwnerRecord{ServerID: "s1", Control: coord.Endpoint{Address: "h:1"}, TTLMillis: 1, AcquiredAt: time.Now()}).Encode(); err == nil {
		t.Error("owner record without protocols encoded")
	}
	if _, err := (coord.OwnerRecord{ServerID: "s1", Protocols: coord.Protocols{coord.ProtocolAKKA: {Address: "h:10086"}}, TTLMillis: 1, AcquiredAt: time.Now()}).Encode(); err == nil {
		t.Error("owner record without a control address encoded")
	}
	if _, err := (coord.OwnerRecord{ServerID: "s1", Control: coord.Endpoint{Address: "h:1"}, Protocols: coord.Protocols{coord.ProtocolAKKA: {Address: "h:10086"}}, TTLMillis: 1, AcquiredAt: time.Now()}).Encode(); err != nil {
		t.Errorf("owner record offering AKKA only: %v", err)
	}
	if _, err := (coord.AppRecord{ID: 0, Name: "x", CreatedAt: time.Now()}).Encode(); err == nil {
		t.Error("app record with id 0 encoded")
	}
}

func TestDecodeIsStrict(t *testing.T) {
	const ok = `{"version":1,"serverId":"s1","control":{"address":"h:7"},"protocols":{"HTTP":{"address":"h:1"}},"ttlMillis":5000,"acquiredAt":"2026-11-26T03:00:00Z"}`
	if _, err := coord.DecodeOwnerRecord([]byte(ok)); err != nil {
		t.Fatalf("valid record refused: %v", err)
	}
	for name, in := range map[string]string{
		"empty":         ``,
		"null":          `null`,
		"not json":      `current-server`,
		"array":         `[1,2]`,
		"unknown field": `{"version":1,"serverId":"s1","control":{"address":"h:7"},"protocols":{"HTTP":{"address":"h:1"}},"ttlMillis":5000,"acquiredAt":"2026-11-26T03:00:00Z","extra":1}`,
		"newer version": `{"version":2,"serverId":"s1","control":{"address":"h:7"},"protocols":{"HTTP":{"address":"h:1"}},"ttlMillis":5000,"acquiredAt":"2026-11-26T03:00:00Z"}`,
		"no version":    `{"serverId":"s1","control":{"address":"h:7"},"protocols":{"HTTP":{"address":"h:1"}},"ttlMillis":5000,"acquiredAt":"2026-11-26T03:00:00Z"}`,
		"no protocol":   `{"version":1,"serverId":"s1","control":{"address":"h:7"},"protocols":{},"ttlMillis":5000,"acquiredAt":"2026-11-26T03:00:00Z"}`,
		"no control":    `{"version":1,"serverId":"s1","protocols":{"HTTP":{"address":"h:1"}},"ttlMillis":5000,"acquiredAt":"2026-11-26T03:00:00Z"}`,
		"empty address": `{"version":1,"serverId":"s1","control":{"address":"h:7"},"protocols":{"HTTP":{"address":""}},"ttlMillis":5000,"acquiredAt":"2026-11-26T03:00:00Z"}`,
		"zero ttl":      `{"version":1,"serverId":"s1","control":{"address":"h:7"},"protocols":{"HTTP":{"address":"h:1"}},"ttlMillis":0,"acquiredAt":"2026-11-26T03:00:00Z"}`,
		"wrong type":    `{"version":"1","serverId":"s1","control":{"address":"h:7"},"protocols":{"HTTP":{"address":"h:1"}},"ttlMillis":5000,"acquiredAt":"2026-11-26T03:00:00Z"}`,
		"trailing data": ok + `{}`,
		"truncated":     ok[:40],
		"control in id": `{"version":1,"serverId":"s\u0001","control":{"address":"h:7"},"protocols":{"HTTP":{"address":"h:1"}},"ttlMillis":5000,"acquiredAt":"2026-11-26T03:00:00Z"}`,
		"huge":          `{"version":1,"serverId":"` + string(make([]byte, 70<<10)) + `"}`,
	} {
		if _, err := coord.DecodeOwnerRecord([]byte(in)); !errors.Is(err, coord.ErrCorruptRecord) {
			t.Errorf("%s: got %v, want ErrCorruptRecord", name, err)
		}
	}
}

func FuzzDecodeRecords(f *testing.F) {
	f.Add([]byte(`{"version":1,"serverId":"s1","control":{"address":"h:7"},"protocols":{"HTTP":{"address":"h:1"}},"ttlMillis":5000,"acquiredAt":"2026-11-26T03:00:00Z"}`))
	f.Add([]byte(`{"version":1,"id":3,"name":"x","createdAt":"2026-11-26T03:00:00Z"}`))
	f.Add([]byte(`{"version":1,"serverId":"s","protocols":{"HTTP":{"address":"a"}},"startedAt":"2026-11-26T03:00:00Z"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		// Never a panic; an error is always ErrCorruptRecord.
		for _, decode := range []func([]byte) error{
			func(b []byte) error { _, err := coord.DecodeOwnerRecord(b); return err },
			func(b []byte) error { _, err := coord.DecodeServerRecord(b); return err },
			func(b []byte) error { _, err := coord.DecodeAppRecord(b); return err },
		} {
			if err := decode(data); err != nil && !errors.Is(err, coord.ErrCorruptRecord) {
				t.Fatalf("decode error %v is not ErrCorruptRecord", err)
			}
		}
	})
}
