//! Which addresses an outgoing webhook may reach.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether a webhook may be sent to `ip`: a public unicast address. Loopback, private,
/// shared (carrier-grade NAT), link-local, unique-local, unspecified, broadcast,
/// multicast and documentation addresses are refused, as is an IPv6 address that maps or
/// embeds one of them. `allow_private` (`WEBHOOK_ALLOW_PRIVATE=true`) allows them all.
pub fn address_allowed(ip: IpAddr, allow_private: bool) -> bool {
    allow_private
        || match ip {
            IpAddr::V4(v4) => public_v4(v4),
            IpAddr::V6(v6) => public_v6(v6),
        }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space, 100.64.0.0/10
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking, 198.18.0.0/15
        || a >= 240) // reserved
}

fn public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return public_v4(v4);
    }
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local, fc00::/7
        || (first & 0xffc0) == 0xfe80 // link-local, fe80::/10
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation, 2001:db8::/32
        || first == 0x0064 && ip.segments()[1] == 0xff9b // NAT64, 64:ff9b::/96 embeds IPv4
        || first == 0x2002 // 6to4, embeds an IPv4 address
        || ip.segments()[..6] == [0; 6]) // IPv4-compatible (deprecated), ::a.b.c.d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_unicast_addresses_are_reached() {
        let cases = [
            ("93.184.215.14", true),
            ("8.8.8.8", true),
            ("2606:4700:4700::1111", true),
            ("127.0.0.1", false),
            ("127.255.0.9", false),
            ("10.0.0.1", false),
            ("172.16.5.4", false),
            ("172.31.255.255", false),
            ("172.32.0.1", true),
            ("192.168.1.1", false),
            ("169.254.169.254", false), // cloud metadata
            ("100.64.0.1", false),
            ("100.128.0.1", true),
            ("0.0.0.0", false),
            ("0.1.2.3", false),
            ("255.255.255.255", false),
            ("224.0.0.1", false),
            ("192.0.2.1", false),
            ("198.18.0.1", false),
            ("240.0.0.1", false),
            ("::1", false),
            ("::", false),
            ("fd00::1", false),
            ("fe80::1", false),
            ("ff02::1", false),
            ("2001:db8::1", false),
            ("::ffff:127.0.0.1", false),
            ("::ffff:10.0.0.1", false),
            ("::ffff:8.8.8.8", true),
            ("64:ff9b::a00:1", false),
            ("2002:a00:1::", false),
            ("::127.0.0.1", false),
        ];
        for (ip, allowed) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(address_allowed(ip, false), allowed, "{ip}");
            assert!(address_allowed(ip, true), "{ip} with WEBHOOK_ALLOW_PRIVATE");
        }
    }
}
